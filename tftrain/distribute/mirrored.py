"""``--strategy=mirrored``: one replica per local GPU, or per logical CPU device."""

from __future__ import annotations

from tftrain import resources
from tftrain.distribute.base import ParallelMode, Placement
from tftrain.errors import ConfigError


class Mirrored(ParallelMode):
    name = "mirrored"

    @classmethod
    def check(cls, config, cluster) -> None:
        if cluster is not None and cluster.num_workers > 1:
            super().check(config.replace(num_replicas=1), cluster)

    def default_threads(self) -> tuple[int, int]:
        """A share of the cores per replica on logical CPU devices.

        With TensorFlow's default (a thread per core inside every op) the
        replicas' ops fight over the cores; a share each was measured 1.1-1.3x
        faster than one device (BUILD_NOTES.md), against 0.8x.
        """
        import tensorflow as tf

        replicas = self.config.num_replicas
        if replicas < 2 or tf.config.list_physical_devices("GPU"):
            return 0, 0
        return max(1, resources.usable_cores() // replicas), 0

    def create(self) -> Placement:
        import tensorflow as tf

        devices = _local_devices(self.config.num_replicas)
        ops = _cross_device_ops(self.config.all_reduce, devices)
        return Placement(tf.distribute.MirroredStrategy(devices, cross_device_ops=ops))


def _local_devices(num_replicas: int) -> list[str]:
    """``num_replicas`` GPUs where there are enough, else logical CPU devices."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) >= num_replicas:
        return [f"/gpu:{i}" for i in range(num_replicas)]
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * num_replicas
        )
    except RuntimeError:  # already initialised (a test process): use what is there
        have = len(tf.config.list_logical_devices("CPU"))
        if have < num_replicas:
            raise ConfigError(
                f"--num_replicas={num_replicas}: TensorFlow was already started with "
                f"{have} CPU device(s); logical devices must be set up before any "
                "other TensorFlow work."
            ) from None
    return [f"/cpu:{i}" for i in range(num_replicas)]


def _cross_device_ops(name: str, devices: list[str]):
    import tensorflow as tf

    on_cpus = devices[0].startswith("/cpu")
    if name == "auto":
        # TensorFlow's default on CPU devices is CollectiveAllReduce, the
        # multi-worker path, even within one process; a plain sum on one
        # device was measured faster (BUILD_NOTES.md).
        return tf.distribute.ReductionToOneDevice() if on_cpus else None
    if name == "reduction_to_one_device":
        return tf.distribute.ReductionToOneDevice()
    if name == "nccl":
        if on_cpus:
            raise ConfigError(
                "--all_reduce=nccl needs GPUs; this machine has none: "
                "expected auto, hierarchical_copy or reduction_to_one_device."
            )
        return tf.distribute.NcclAllReduce()
    return tf.distribute.HierarchicalCopyAllReduce()  # validated: the last choice
