"""``--strategy=multi_worker_mirrored``: synchronous data parallelism across
processes and machines, from ``TF_CONFIG``.

On CPU workers the gradients are summed by tftrain's TCP ring
(:mod:`tftrain.distribute.ring`): TensorFlow's gRPC collectives cost
milliseconds a step there (BUILD_NOTES.md).
"""

from __future__ import annotations

from tftrain.config import check_batch_splits
from tftrain.distribute.base import ParallelMode, Placement
from tftrain.errors import ConfigError


class MultiWorkerMirrored(ParallelMode):
    name = "multi_worker_mirrored"

    @classmethod
    def check(cls, config, cluster) -> None:
        super().check(config, None)
        if cluster is None:
            raise ConfigError(
                "--strategy=multi_worker_mirrored needs a cluster in TF_CONFIG (tftrain "
                "launch --num_workers=N sets one up); in one process, use "
                "--strategy=one_device or mirrored."
            )
        extra = sorted(set(cluster.cluster) - {"chief", "worker", "evaluator"})
        if extra:
            raise ConfigError(
                f"--strategy=multi_worker_mirrored does not use {', '.join(extra)} "
                "tasks, but TF_CONFIG's cluster has them: expected only chief and "
                "worker tasks (use --strategy=parameter_server for ps tasks)."
            )
        if cluster.task_type not in cls.training_roles:
            raise ConfigError(
                f"TF_CONFIG task type {cluster.task_type!r} is not supported by "
                "--strategy=multi_worker_mirrored: expected a chief or worker task."
            )
        # Each worker trains on its share of every global batch (at least one
        # replica each): checked here, so that `tftrain launch` says it before
        # starting any task.
        check_batch_splits(
            config.batch_size, cluster.num_workers, config.microbatches, over="workers"
        )

    @property
    def _multi(self) -> bool:
        return self.cluster is not None and self.cluster.num_workers > 1

    def watchdog(self):
        if not self._multi:
            return super().watchdog()
        from tftrain.distribute.watchdog import Watchdog

        watchdog = Watchdog(self.config.collective_timeout_secs, self.cluster)
        watchdog.kick("waiting for every worker of the cluster to start")
        return watchdog

    def create(self) -> Placement:
        import tensorflow as tf

        config, cluster = self.config, self.cluster
        has_gpus = bool(tf.config.list_physical_devices("GPU"))
        use_tcp = config.collective == "tcp" or (config.collective == "auto" and not has_gpus)
        if config.collective == "nccl" and not has_gpus:
            raise ConfigError(
                "--collective=nccl needs GPUs; this machine has none: expected auto, tcp or grpc."
            )
        implementations = tf.distribute.experimental.CommunicationImplementation
        implementation = {
            "grpc": implementations.RING,
            "nccl": implementations.NCCL,
        }.get(config.collective, implementations.AUTO)
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=implementation, bytes_per_pack=config.collective_pack_bytes
        )
        try:
            strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        except tf.errors.OpError as e:
            where = f" on {cluster.address}" if cluster else ""
            raise ConfigError(
                f"could not start this task's server{where} "
                f"({e.message.strip().splitlines()[0]}): is another "
                "program using that port?"
            ) from None
        # Sums a tensor over the workers: the stop vote and the end barrier.
        self._sum = _summing_function(strategy)
        if cluster is None:
            return Placement(strategy)
        workers = cluster.training_tasks()
        rank = workers.index((cluster.task_type, cluster.task_index))
        reducer = None
        if use_tcp and len(workers) > 1:
            hosts = [cluster.host_of(t, i) for t, i in workers]
            reducer = _gradient_ring(
                self._sum, rank, hosts, config.collective_timeout_secs, config.ring_port
            )
        return Placement(strategy, cluster.is_chief, cluster.num_workers, rank, reducer)

    def input_pipeline(self) -> tuple[int, int]:
        return self.placement.num_workers, self.placement.worker_index

    def explain(self, error: BaseException) -> str | None:
        reducer = self.placement.gradient_reducer if self.placement else None
        failure = getattr(reducer, "failure", None)
        if failure is not None:
            return f"lost contact with another worker: {failure}"
        return None

    def agree_to_stop(self, requested: bool) -> bool:
        if not self._multi:
            return requested
        import tensorflow as tf

        # One small collective per stretch of steps: a signal to any worker
        # stops them all at the same step.
        return float(self._sum(tf.constant(1.0 if requested else 0.0)).numpy()) > 0

    def finish(self) -> None:
        if self._multi:
            # A worker that exits while the chief still exports is reported by
            # TensorFlow's coordination service as a crashed task, and the
            # chief waits for it: leave together.
            import tensorflow as tf

            self._sum(tf.constant(1.0))  # a barrier


def _summing_function(strategy):
    """A tf.function summing its argument (this worker's tensor) over every
    replica of ``strategy``: a collective every worker must join."""
    import tensorflow as tf

    @tf.function
    def total(value):
        per_replica = strategy.run(tf.identity, args=(value,))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return total


def _gradient_ring(sum_over_workers, rank: int, hosts: list[str], timeout: float, port: int = 0):
    """Forms tftrain's TCP ring among the workers (``sum_over_workers``: the
    strategy's summing function).

    Each worker listens on ``port`` (0: a free port) of its own host (from TF_CONFIG); the
    ports are then summed across workers with one TensorFlow collective, so
    the ring needs no ports beyond TF_CONFIG's.
    """
    import tensorflow as tf

    from tftrain.distribute.ring import RingAllReduce, RingError
    from tftrain.errors import LostTaskError

    ring = RingAllReduce(rank, len(hosts), timeout)
    try:
        port = ring.listen(hosts[rank], port)
    except OSError as e:
        raise ConfigError(
            f"could not open the gradient ring's socket on {hosts[rank]} ({e.strerror or e})"
        ) from None
    ports = sum_over_workers(tf.one_hot(rank, len(hosts), dtype=tf.int64) * port)
    ports = [int(p) for p in ports.numpy()]
    try:
        ring.connect(list(zip(hosts, ports)))
    except (OSError, RingError) as e:
        ring.close()
        raise LostTaskError(f"could not form the gradient ring between the workers: {e}") from None
    return ring
