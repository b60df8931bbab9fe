"""``--strategy=parameter_server``: asynchronous SGD with parameter servers.

The ``chief`` is the coordinator: it builds the model and optimizer under
``tf.distribute.ParameterServerStrategy`` (their variables live on the
``ps`` tasks), and schedules loops of steps on the ``worker`` tasks with a
``ClusterCoordinator``; each worker reads and updates the variables
without waiting for the others. ``ps`` and ``worker`` tasks run the same
``tftrain train`` command: they serve (:func:`serve`) until the coordinator
is gone, then exit 0.

Each step is one update of ``--batch_size`` examples, as on one device:
worker ``i`` of ``W`` takes global batches ``i, i + W, ...`` of the run's
stream. The global step is advanced once per loop, after the loop's steps
(a data dependency orders it), so it counts each applied update once; the
optimizer's own counter adds in place (tftrain's optimizers), so Adam's
bias correction and the learning-rate schedule see every update.
"""

from __future__ import annotations

from tftrain import resources
from tftrain.distribute import serving
from tftrain.distribute.base import ParallelMode, Placement
from tftrain.errors import ConfigError


class ParameterServer(ParallelMode):
    name = "parameter_server"
    training_roles = frozenset({"chief"})
    serving_roles = frozenset({"worker", "ps"})
    takes_evaluator = True
    holds_variables = False

    @classmethod
    def check(cls, config, cluster) -> None:
        super().check(config, None)
        if cluster is None or "ps" not in cluster.cluster:
            raise ConfigError(
                "--strategy=parameter_server needs a TF_CONFIG cluster with ps tasks "
                "(tftrain launch --num_ps=M sets one up)."
            )
        for role, why in (("chief", "the coordinator"), ("worker", "they run the steps")):
            if role not in cluster.cluster:
                raise ConfigError(
                    f"--strategy=parameter_server needs {role} task(s) in TF_CONFIG's "
                    f"cluster ({why}); it has {', '.join(cluster.cluster)}."
                )
        if cluster.task_type not in cls.training_roles | cls.serving_roles | {"evaluator"}:
            raise ConfigError(
                f"TF_CONFIG task type {cluster.task_type!r} is not supported by "
                "--strategy=parameter_server: expected chief, worker, ps or evaluator."
            )

    @property
    def num_workers(self) -> int:
        return len(self.cluster.cluster["worker"])

    @property
    def loops_between_syncs(self) -> int:
        return 2 * self.num_workers  # every worker busy, one loop queued each

    def default_threads(self) -> tuple[int, int]:
        return 0, resources.cluster_inter_op_threads(self.num_workers)

    def watchdog(self):
        from tftrain.distribute.watchdog import Watchdog

        watchdog = Watchdog(self.config.collective_timeout_secs, self.cluster)
        watchdog.kick("connecting to the parameter servers and workers")
        return watchdog

    def create(self) -> Placement:
        import tensorflow as tf

        # The evaluator runs no server: the coordinator must not wait for it.
        jobs = {k: list(v) for k, v in self.cluster.cluster.items() if k != "evaluator"}
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec(jobs), task_type="chief", task_id=0, rpc_layer="grpc"
        )
        strategy = tf.distribute.ParameterServerStrategy(resolver)
        self.coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
        return Placement(strategy, True, self.num_workers, 0)

    saves_input_position = False  # a coordinator's per-worker iterators cannot be saved
    local_replicas = 1  # each worker's step takes a whole batch

    def distribute_train(self, make_dataset):
        import tensorflow as tf

        workers = self.num_workers

        def per_worker():
            # Every worker builds the whole stream and takes every W-th batch.
            index = tf.distribute.coordinator.experimental_get_current_worker_index()
            return make_dataset(None).shard(workers, index)

        return iter(self.coordinator.create_per_worker_dataset(per_worker))

    def evaluator(self, trainer, make_dataset):
        data = make_dataset(None)  # evaluated on the coordinator, reading the ps variables
        return lambda: trainer.evaluate(data, in_replica=False)

    def run_steps(self, trainer, iterator, loops: list[int]) -> None:
        import tensorflow as tf

        for num_steps in loops:  # queued for whichever worker is free
            self.coordinator.schedule(
                trainer.loop, args=(iterator, tf.constant(num_steps, tf.int64))
            )
        self.coordinator.join()

    def make_trainer(self, **kwargs):
        from tftrain.staleness import StalenessTrainer

        self.trainer = StalenessTrainer(**kwargs)
        return self.trainer

    def describe(self) -> dict:
        described = {"num_ps": len(self.cluster.cluster["ps"])}
        if getattr(self, "trainer", None) is not None:
            described["staleness"] = self.trainer.run_staleness()
            described["ps_variables"] = _where(self.trainer.model.variables)
        return described

    def serve(self) -> int:
        """Serves this ps or worker task until the coordinator is gone; returns
        the exit code (0, or 1 if the coordinator never appeared)."""
        return serving.serve(
            self.cluster,
            self.config.collective_timeout_secs,
            self.default_threads()[1],
            config=self.config,
        )


def _where(variables) -> dict[str, list[str]]:
    """The model's variables held by each ps task (``ps:0``: [paths])."""
    import re

    held: dict[str, list[str]] = {}
    for v in variables:
        device = getattr(getattr(v, "value", v), "device", "") or ""
        m = re.search(r"/job:(\w+)/replica:\d+/task:(\d+)", device)
        held.setdefault(f"{m[1]}:{m[2]}" if m else device or "?", []).append(v.path)
    return held
