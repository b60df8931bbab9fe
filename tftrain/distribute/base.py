"""The strategy seam: what a parallel mode provides, and nothing it must not.

A parallel mode is one module under ``tftrain/distribute/`` with a
:class:`ParallelMode` subclass, and one line in
:data:`tftrain.plugins.STRATEGIES`. It decides:

- ``check``: what the config and ``TF_CONFIG`` must hold for it, before
  anything starts;
- ``create``: the ``tf.distribute`` strategy and this task's place;
- ``distribute_train`` / ``evaluator``: how datasets reach replicas, and
  where the evaluation runs;
- ``run_steps``: how a stretch of steps is dispatched (direct calls, or a
  coordinator's ``schedule`` and ``join``);
- ``finish``: what every task does before it leaves.

The controller calls these and never branches on a mode's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from tftrain.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Placement:
    """The strategy, and this task's place among the tasks that train."""

    strategy: object  # tf.distribute.Strategy
    is_chief: bool = True
    num_workers: int = 1
    worker_index: int = 0
    # Sums the gradients across workers in place of the strategy (tftrain's
    # TCP ring, multi_worker_mirrored on CPUs); None: the strategy's own.
    gradient_reducer: object = None

    @property
    def num_replicas(self) -> int:
        return self.strategy.num_replicas_in_sync


# make_dataset(context) -> the tf.data.Dataset of one input pipeline, batched
# per replica (tf.distribute.InputContext; None: one pipeline, one replica).
DatasetFn = Callable[[object], object]


class ParallelMode:
    """One way to train in parallel. Subclass it and register the subclass.

    Args:
      config: the validated ExperimentConfig.
      cluster: the parsed TF_CONFIG (a ClusterInfo), or None.
    """

    name = ""
    # TF_CONFIG task types that run the training loop, and those that serve
    # (``serve``) while another task drives them.
    training_roles: frozenset[str] = frozenset({"chief", "worker"})
    serving_roles: frozenset[str] = frozenset()
    # Whether an ``evaluator`` task may evaluate this mode's checkpoints beside it.
    takes_evaluator = False
    # Whether this process holds the model's variables (not parameter servers).
    holds_variables = True

    def __init__(self, config, cluster=None):
        self.config, self.cluster = config, cluster
        self.placement: Placement | None = None

    # -- before anything starts ----------------------------------------------

    @classmethod
    def check(cls, config, cluster) -> None:
        """Raises ConfigError for a config or cluster this mode cannot run.

        The default: one process, one replica.
        """
        if config.num_replicas != 1:
            raise ConfigError(
                f"--num_replicas={config.num_replicas} applies to "
                f"--strategy=mirrored only (got --strategy={config.strategy})."
            )
        if cluster is not None and cluster.num_workers > 1:
            raise ConfigError(
                f"the cluster has {cluster.num_workers} workers (TF_CONFIG, as tftrain launch, "
                f"a TFJob or Slurm sets it), but --strategy={config.strategy} runs in one "
                "process: expected --strategy=multi_worker_mirrored, parameter_server or "
                "model_parallel (or one process, without TF_CONFIG)."
            )

    def default_threads(self) -> tuple[int, int]:
        """(intra-op, inter-op) threads when the config sets none; 0: TensorFlow's."""
        return 0, 0

    def watchdog(self):
        """Watches the stages that can block on other tasks (NoWatchdog: none)."""
        from tftrain.distribute.watchdog import NoWatchdog

        return NoWatchdog()

    # -- the strategy ------------------------------------------------------

    def create(self) -> Placement:
        raise NotImplementedError

    def setup(self) -> Placement:
        self.placement = self.create()
        return self.placement

    @property
    def strategy(self):
        return self.placement.strategy

    # -- the model and its trainer -----------------------------------------

    def place_model(self, model):
        """The model to train: ``model`` as built under the strategy's scope,
        or a copy of it placed otherwise (a pipeline's stages); the same
        layers and weights either way."""
        return model

    def make_trainer(self, **kwargs):
        """The trainer of this mode's steps (``kwargs``: tftrain.trainer.Trainer's)."""
        from tftrain.trainer import Trainer

        return Trainer(**kwargs)

    # -- data --------------------------------------------------------------

    # Whether the training iterator's position can be saved in a checkpoint
    # (TensorFlow cannot save a coordinator's per-worker iterators).
    saves_input_position = True

    def input_pipeline(self) -> tuple[int, int]:
        """(input pipelines, this process's pipeline): one per worker that trains."""
        return 1, 0

    @property
    def local_replicas(self) -> int:
        """Replicas of the strategy in this process (each takes one per-replica batch)."""
        return max(1, self.strategy.num_replicas_in_sync // self.input_pipeline()[0])

    def distribute_train(self, make_dataset: DatasetFn):
        """An iterator of the training batches, as the trainer takes them.

        One plain tf.data iterator per process, so that its position can be
        saved in a checkpoint (TensorFlow's distributed iterators cannot be):
        each element holds the per-replica batches of this process's
        replicas, stacked when there are several (``Trainer`` hands replica i
        its slice), as ``distribute_datasets_from_function`` would hand them out.
        """
        from tftrain import inputs

        pipelines, index = self.input_pipeline()
        local = self.local_replicas
        context = inputs.input_context(pipelines, index, self.strategy.num_replicas_in_sync)
        ds = make_dataset(context)
        if local > 1:
            ds = ds.batch(local, drop_remainder=True)
        return iter(ds)

    def evaluator(self, trainer, make_dataset: DatasetFn) -> Callable[[], dict]:
        """A function that returns the task's metrics over the evaluation
        set: distributed over the replicas here."""
        data = self.strategy.distribute_datasets_from_function(make_dataset)
        return lambda: trainer.evaluate(data)

    # -- dispatch ----------------------------------------------------------

    # Loops of steps in one stretch, between two reads of their results: 1
    # for modes whose loops run when called; more for one whose loops run
    # asynchronously (so that every worker has one queued).
    loops_between_syncs = 1

    def run_steps(self, trainer, iterator, loops: list[int]) -> None:
        """Runs a stretch of training steps, ``loops`` of them per graph
        call, and returns once all have run (here: one call after another)."""
        for num_steps in loops:
            trainer.train(iterator, num_steps)

    def announce(self) -> list[str]:
        """Lines to show the person watching when training starts."""
        return []

    def describe(self) -> dict:
        """What metrics.json records about this mode beyond replicas and workers."""
        return {}

    def serves(self, cluster) -> bool:
        """Whether this task of ``cluster`` serves (``serve``) instead of training."""
        return cluster.task_type in self.serving_roles

    def serve(self) -> int:
        """Runs a serving role (see ``serving_roles``) to its end; returns the exit code."""
        raise NotImplementedError

    def agree_to_stop(self, requested: bool) -> bool:
        """Whether the run stops now: True on every task if any task asks to
        (a signal arrived), so that all stop at the same step."""
        return requested

    def explain(self, error: BaseException) -> str | None:
        """A one-line account of ``error`` if this mode knows its cause; else None."""
        return None

    # -- the end -----------------------------------------------------------

    def finish(self) -> None:
        """What every task does before it leaves (a barrier, a goodbye)."""


def mode_for(config, cluster=None) -> ParallelMode:
    """The registered mode of ``config.strategy``, checked against the config
    and the cluster (ConfigError when they do not fit)."""
    from tftrain import plugins

    cls = plugins.STRATEGIES.get(config.strategy)
    cls.check(config, cluster)
    return cls(config, cluster)
