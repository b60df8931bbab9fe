"""A pure strategy factory: the strategy follows from its arguments alone.

Call it before any other TensorFlow work: logical CPU devices and the
multi-worker collectives can only be configured at program start.
"""

from __future__ import annotations

import dataclasses

from tftrain.config import ConfigError
from tftrain.distribute.cluster import ClusterInfo


@dataclasses.dataclass(frozen=True)
class Placement:
    """What the trainer needs to know about the strategy it runs under."""

    strategy: object  # tf.distribute.Strategy
    is_chief: bool
    num_workers: int
    worker_index: int
    # Sums the gradients across workers in place of TensorFlow's collectives
    # (tftrain's TCP ring, multi_worker_mirrored on CPUs); None: the strategy's own.
    gradient_reducer: object = None

    @property
    def num_replicas(self) -> int:
        return self.strategy.num_replicas_in_sync


def configure_threads(intra_op: int = 0, inter_op: int = 0, spinning: bool = True) -> None:
    """Sizes TensorFlow's thread pools (0 leaves TensorFlow's default).

    ``spinning=False`` stops idle pool threads from spinning while they wait
    for work: right for a process that shares its cores with other workers
    (spinning there takes CPU the peers need; measured in BUILD_NOTES.md).
    """
    import tensorflow as tf

    if intra_op:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    if inter_op:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    if not spinning:
        # ConfigProto.experimental.disable_thread_spinning has no tf.config
        # setter; the eager context builds its ConfigProto from _config.
        from tensorflow.core.protobuf import config_pb2
        from tensorflow.python.eager import context

        ctx = context.context()
        config = config_pb2.ConfigProto()
        if getattr(ctx, "_config", None) is not None:
            config.CopyFrom(ctx._config)
        config.experimental.disable_thread_spinning = True
        ctx._config = config


def default_intra_op_threads(strategy: str, num_replicas: int) -> int:
    """Intra-op threads to use when the user set none (0: TensorFlow's default).

    ``mirrored`` on logical CPU devices runs its replicas' ops side by side;
    with TensorFlow's default (a thread per core inside every op) they fight
    over the cores. A share of the cores per replica was measured 1.1-1.3x
    faster than one device (BUILD_NOTES.md), against 0.8x with the default.
    """
    import os

    import tensorflow as tf

    if strategy != "mirrored" or num_replicas < 2 or tf.config.list_physical_devices("GPU"):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // num_replicas)


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

    if name == "auto":
        if devices[0].startswith("/cpu"):
            # TensorFlow's default on CPU devices is CollectiveAllReduce, the
            # multi-worker path, even within one process; a plain sum on one
            # device was measured faster (BUILD_NOTES.md).
            return tf.distribute.ReductionToOneDevice()
        return None
    if name == "reduction_to_one_device":
        return tf.distribute.ReductionToOneDevice()
    if name == "nccl":
        if not devices[0].startswith("/gpu"):
            raise ConfigError(
                "--all_reduce=nccl needs GPUs; this machine has none: "
                "expected auto or hierarchical_copy."
            )
        return tf.distribute.NcclAllReduce()
    if name == "hierarchical_copy":
        return tf.distribute.HierarchicalCopyAllReduce()
    raise ConfigError(
        f"--all_reduce={name} applies to --strategy=multi_worker_mirrored "
        "(as --collective=ring); for mirrored expected auto, nccl, "
        "hierarchical_copy or reduction_to_one_device."
    )


def create(
    strategy: str,
    *,
    num_replicas: int = 1,
    all_reduce: str = "auto",
    collective: str = "auto",
    collective_pack_bytes: int = 0,
    cluster: ClusterInfo | None = None,
    ring_timeout_secs: float = 300.0,
) -> Placement:
    """Creates the tf.distribute strategy by name.

    Args:
      strategy: ``one_device``, ``mirrored`` or ``multi_worker_mirrored``.
      num_replicas: local replicas for ``mirrored``.
      all_reduce: the cross-device reduction for ``mirrored``.
      collective: the collective implementation for ``multi_worker_mirrored``.
      collective_pack_bytes: all-reduce gradients in packs of this many bytes
        (0: one pack).
      cluster: the parsed TF_CONFIG, if any.
      ring_timeout_secs: how long tftrain's TCP ring waits for a peer.

    Raises:
      ConfigError: for a choice this machine or cluster cannot run.
    """
    import tensorflow as tf

    if strategy == "one_device":
        device = "/gpu:0" if tf.config.list_physical_devices("GPU") else "/cpu:0"
        return Placement(tf.distribute.OneDeviceStrategy(device), True, 1, 0)
    if strategy == "mirrored":
        devices = _local_devices(num_replicas)
        return Placement(
            tf.distribute.MirroredStrategy(
                devices, cross_device_ops=_cross_device_ops(all_reduce, devices)
            ),
            True,
            1,
            0,
        )
    if strategy == "multi_worker_mirrored":
        has_gpus = bool(tf.config.list_physical_devices("GPU"))
        # On CPUs tftrain's TCP ring sums the gradients: TensorFlow's gRPC
        # collectives cost milliseconds a step there (BUILD_NOTES.md).
        use_tcp = collective == "tcp" or (collective == "auto" and not has_gpus)
        implementation = {
            "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
            "tcp": tf.distribute.experimental.CommunicationImplementation.AUTO,
            "ring": tf.distribute.experimental.CommunicationImplementation.RING,
            "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
        }[collective]
        if collective == "nccl" and not has_gpus:
            raise ConfigError(
                "--collective=nccl needs GPUs; this machine has none: expected auto, tcp or ring."
            )
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=implementation, bytes_per_pack=collective_pack_bytes
        )
        try:
            mwms = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        except tf.errors.OpError as e:
            where = f" on {cluster.address}" if cluster else ""
            raise ConfigError(
                f"could not start this task's server{where} "
                f"({e.message.strip().splitlines()[0]}): is another "
                "program using that port?"
            ) from None
        if cluster is None:
            return Placement(mwms, True, 1, 0)
        workers = sorted(
            (t, i) for t in ("chief", "worker") for i in range(len(cluster.cluster.get(t, ())))
        )
        rank = workers.index((cluster.task_type, cluster.task_index))
        reducer = None
        if use_tcp and len(workers) > 1:
            hosts = [cluster.cluster[t][i].rsplit(":", 1)[0].strip("[]") for t, i in workers]
            reducer = _gradient_ring(mwms, rank, hosts, ring_timeout_secs)
        return Placement(mwms, cluster.is_chief, cluster.num_workers, rank, reducer)
    raise ConfigError(f"--strategy={strategy} is not available in this version.")


def sum_over_workers(strategy, value):
    """``value`` (this worker's tensor) summed over every replica of ``strategy``.

    A collective every worker must join: also a barrier.
    """
    import tensorflow as tf

    @tf.function
    def total():
        per_replica = strategy.run(lambda: tf.identity(value))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return total()


def _gradient_ring(strategy, rank: int, hosts: list[str], timeout: float):
    """Forms tftrain's TCP ring among the workers of ``strategy``.

    Each worker listens on a free port of its own host (from TF_CONFIG); the
    ports are then summed across workers with one TensorFlow collective, so
    the ring needs no ports beyond TF_CONFIG's.
    """
    import tensorflow as tf

    from tftrain.distribute.ring import RingAllReduce, RingError

    ring = RingAllReduce(rank, len(hosts), timeout)
    try:
        port = ring.listen(hosts[rank])
    except OSError as e:
        raise ConfigError(
            f"could not open the gradient ring's socket on {hosts[rank]} ({e.strerror or e})"
        ) from None
    ports = sum_over_workers(strategy, tf.one_hot(rank, len(hosts), dtype=tf.int64) * port)
    ports = [int(p) for p in ports.numpy()]
    try:
        ring.connect(list(zip(hosts, ports)))
    except (OSError, RingError) as e:
        ring.close()
        raise ConfigError(f"could not form the gradient ring between the workers: {e}") from None
    return ring
