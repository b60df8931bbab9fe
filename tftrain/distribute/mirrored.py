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

        devices = resources.local_devices(self.config.num_replicas, "--num_replicas")
        ops = _cross_device_ops(self.config.all_reduce, devices)
        return Placement(tf.distribute.MirroredStrategy(devices, cross_device_ops=ops))


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
