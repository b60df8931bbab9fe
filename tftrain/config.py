"""The typed run configuration: every default in one place, validated once.

The CLI turns flags into an :class:`ExperimentConfig`; everything below the
CLI takes that object (or explicit arguments), never flags. The choices of
the open-ended fields (strategy, model, optimizer, task) come from
:mod:`tftrain.plugins`; the closed ones are listed here, once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from tftrain import plugins, resources
from tftrain.errors import ConfigError

__all__ = ["ConfigError", "ExperimentConfig", "check_batch_splits"]

DATASETS_BUILTIN = ("fashion_mnist", "mnist", "cifar10", "synthetic", "synthetic_tokens")
LR_SCHEDULES = ("constant", "cosine", "step")
PIPELINE_SCHEDULES = ("gpipe", "1f1b")
ON_NAN = ("stop", "skip_step")
PRECISIONS = ("float32", "bfloat16")
PIPELINE_BALANCES = ("time", "params")
PIPELINE_FIELDS = ("num_stages", "pipeline_schedule", "pipeline_balance")
ALL_REDUCE = ("auto", "nccl", "hierarchical_copy", "reduction_to_one_device")
# tcp: tftrain's ring all-reduce over TCP (CPU workers); grpc: TensorFlow's
# ring collectives over its gRPC worker service; nccl: NVIDIA's, on GPUs.
COLLECTIVES = ("auto", "tcp", "grpc", "nccl")
MAX_SEED = 2**32 - 1
# The built-in task's fields: what --model and --dataset train.
BUILTIN_TASK_FIELDS = ("dataset", "model", "hidden_units", "embedding_shards")
DEFAULT_HIDDEN_UNITS = (256, 128)


@dataclasses.dataclass
class ExperimentConfig:
    """Everything a training run needs to know.

    Field names are the flag names, and the TensorBoard tags use the same
    words, so one idea has one name everywhere.
    """

    experiment: str | None = None
    # Where the experiment came from (a file's absolute path, or a module's
    # name): recorded in config.json; set when the experiment is loaded.
    experiment_source: str | None = dataclasses.field(default=None, metadata={"flag": False})
    # The user's own options (name -> default): each is a flag of its own
    # (--name=value), recorded in config.json, read as config.name.
    options: dict = dataclasses.field(default_factory=dict, metadata={"flag": False})
    # Data and task.
    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    max_train_examples: int | None = None  # a subset, for smoke runs
    max_eval_examples: int | None = None
    # A tftrain.Task subclass, or the name of a registered one.
    task: Any = dataclasses.field(default="classification", metadata={"flag": False})
    # Model and optimizer.
    model: str = "softmax"
    hidden_units: tuple[int, ...] | None = None  # mlp only; None: 256,128
    embedding_shards: int | None = None  # embedding_bag only; None: 1 (one variable)
    # bfloat16: layers compute in bfloat16, variables and updates stay float32.
    precision: str = "float32"
    optimizer: str = "adam"
    learning_rate: float = 0.001
    momentum: float | None = None  # sgd/momentum only; None: 0.9 for momentum, 0 for sgd
    lr_schedule: str = "constant"
    warmup_epochs: float = 0.0
    lr_decay_epochs: tuple[float, ...] = ()  # boundaries for the step schedule
    lr_decay_rate: float = 0.1
    scale_lr_with_batch: bool = False  # linear scaling rule (Goyal et al.)
    base_batch_size: int = 256  # the batch the learning rate is quoted for
    # Schedule of the run.
    batch_size: int = 100  # global: all replicas together
    # Slices of each replica's batch whose gradients are summed into one update
    # (None: 1; under model_parallel, the micro-batches of the pipeline: see
    # ``microbatches``).
    num_microbatches: int | None = None
    eval_batch_size: int = 1000
    epochs: int = 1
    train_steps: int | None = None  # wins over epochs when given
    steps_per_epoch: int | None = dataclasses.field(
        default=None,
        metadata={
            "help": "training steps in one pass over the data (default: the training "
            "dataset's length when it is known)"
        },
    )
    steps_per_loop: int = 100
    checkpoint_interval: int | None = None  # steps; None: once an epoch
    eval_interval: int | None = None  # steps; None: once an epoch
    keep_checkpoints: int = 3
    log_interval_secs: float = 5.0
    # TensorBoard: train scalars every N steps (None: after every loop of
    # steps), weight and gradient histograms every N steps (None: none), and
    # a profiler trace of steps START+1..END (empty: none).
    summary_every: int | None = None
    histogram_every: int | None = None
    profile_steps: tuple[int, ...] = ()
    # A NaN or infinite loss or gradient norm: stop the run, or skip the update.
    on_nan: str = "stop"
    # Distribution.
    strategy: str = "one_device"
    num_replicas: int = 1
    all_reduce: str = "auto"
    collective: str = "auto"
    collective_timeout_secs: float = 300.0
    ring_port: int = 0  # tftrain's TCP ring's port on each worker; 0: a free one
    # Gradients all-reduced in packs of this many bytes by TensorFlow's
    # collectives: ~2x faster on 256 KiB packs than on one 0.9 MB message
    # (benchmarks/allreduce.py); 0 sends one pack.
    collective_pack_bytes: int = 256 * 1024
    # Pipeline model parallelism (model_parallel only; None: 2, gpipe, time).
    num_stages: int | None = None
    pipeline_schedule: str | None = None
    pipeline_balance: str | None = None
    # This process's threads (0: the mode's default).
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    thread_spinning: bool = True
    # Output and reproducibility.
    model_dir: str | None = None
    # Set the files of an earlier run in model_dir aside and start from step 0.
    restart: bool = False
    seed: int = 0
    export: bool = True

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not fields: the user's options.
        options = self.__dict__.get("options")
        if options is not None and name in options:
            return options[name]
        raise AttributeError(
            f"ExperimentConfig has no field or option {name!r}"
            + (f" (its options: {', '.join(options)})" if options else "")
        )

    def replace(self, **changes: Any) -> ExperimentConfig:
        """A copy with ``changes``: fields, or the user's options by name."""
        names = {f.name for f in dataclasses.fields(self)}
        options = {k: changes.pop(k) for k in list(changes) if k not in names}
        unknown = [k for k in options if k not in self.options]
        if unknown:
            raise ConfigError(
                f"{unknown[0]!r} is neither a field of ExperimentConfig nor one of this "
                "experiment's options"
                + (f" ({', '.join(self.options)})" if self.options else "")
                + "."
            )
        if options:
            changes["options"] = {**changes.get("options", self.options), **options}
        return dataclasses.replace(self, **changes)

    @property
    def builtin_task(self) -> bool:
        """Whether the task is tftrain's own (--model and --dataset apply)."""
        return isinstance(self.task, str)

    def to_dict(self) -> dict[str, Any]:
        from tftrain.tasks import task_name

        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if not self.builtin_task:
            values["task"] = task_name(self.task)
            for name in BUILTIN_TASK_FIELDS:  # the built-in task's: not this run's
                values.pop(name, None)
        values["options"] = dict(self.options)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    @property
    def mlp_hidden_units(self) -> tuple[int, ...]:
        return self.hidden_units or DEFAULT_HIDDEN_UNITS

    @property
    def stages(self) -> int:
        return self.num_stages or 2

    @property
    def microbatches(self) -> int:
        """``num_microbatches``, or its default: 1, and under model_parallel
        the first of 4, 2 or 1 micro-batches per stage that splits the batch."""
        if self.num_microbatches is not None:
            return self.num_microbatches
        if self.strategy == "model_parallel":
            for m in (4 * self.stages, 2 * self.stages, self.stages):
                if self.batch_size % m == 0:
                    return m
        return 1

    def validate(self) -> ExperimentConfig:
        """Checks every field and their combinations; raises ConfigError naming
        the first bad one. The strategy's own checks follow in its module."""
        from tftrain.tasks import Task

        if self.builtin_task:
            _one_of("dataset", self.dataset, DATASETS_BUILTIN, open_ended=True)
            _one_of("task", self.task, plugins.TASKS.names())
            _one_of("model", self.model, plugins.MODELS.names())
        elif not (
            (isinstance(self.task, type) and issubclass(self.task, Task))
            or isinstance(self.task, Task)
        ):
            raise ConfigError(
                f"ExperimentConfig(task={self.task!r}): expected a tftrain.Task subclass "
                "(class MyTask(tftrain.Task): ...) or the name of a registered task."
            )
        if not isinstance(self.options, dict):
            raise ConfigError(f"ExperimentConfig(options={self.options!r}): expected a dict.")
        for kind, registry in (
            ("optimizer", plugins.OPTIMIZERS),
            ("strategy", plugins.STRATEGIES),
        ):
            _one_of(kind, getattr(self, kind), registry.names())
        _one_of("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _one_of("all_reduce", self.all_reduce, ALL_REDUCE)
        _one_of("collective", self.collective, COLLECTIVES)
        _one_of("on_nan", self.on_nan, ON_NAN)
        _one_of("precision", self.precision, PRECISIONS)
        _positive_float("learning_rate", self.learning_rate)
        _positive_float("collective_timeout_secs", self.collective_timeout_secs)
        for name in (
            "batch_size",
            "eval_batch_size",
            "epochs",
            "steps_per_loop",
            "keep_checkpoints",
            "num_replicas",
            "base_batch_size",
        ):
            _positive_int(name, getattr(self, name))
        for name in (
            "num_microbatches",
            "num_stages",
            "train_steps",
            "checkpoint_interval",
            "eval_interval",
            "max_train_examples",
            "max_eval_examples",
            "steps_per_epoch",
            "summary_every",
            "histogram_every",
        ):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if isinstance(self.ring_port, bool) or not 0 <= self.ring_port <= 65535:
            raise ConfigError(f"--ring_port={self.ring_port}: expected 0 (a free port) to 65535.")
        if isinstance(self.collective_pack_bytes, bool) or self.collective_pack_bytes < 0:
            raise ConfigError(
                f"--collective_pack_bytes={self.collective_pack_bytes}: expected an "
                "integer >= 0 (0: one pack)."
            )
        if isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"--seed={self.seed}: expected an integer in 0-{MAX_SEED}.")
        if not math.isfinite(self.log_interval_secs) or self.log_interval_secs < 0:
            raise ConfigError(
                f"--log_interval_secs={self.log_interval_secs}: expected a number >= 0."
            )
        limit = min(resources.MAX_THREADS, 64 * resources.usable_cores())
        for name in ("intra_op_threads", "inter_op_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not 0 <= value <= limit:
                raise ConfigError(
                    f"--{name}={value}: expected 0 (the default) to {limit} on this machine."
                )
        if self.momentum is not None:
            if self.optimizer not in ("sgd", "momentum"):
                raise ConfigError(
                    f"--momentum applies to --optimizer=sgd or momentum, not "
                    f"--optimizer={self.optimizer}: drop --momentum or change the optimizer."
                )
            if not 0.0 <= self.momentum < 1.0:
                raise ConfigError(f"--momentum={self.momentum}: expected a number in [0, 1).")
        if not 0.0 < self.lr_decay_rate <= 1.0:
            raise ConfigError(f"--lr_decay_rate={self.lr_decay_rate}: expected a number in (0, 1].")
        if self.warmup_epochs < 0 or not math.isfinite(self.warmup_epochs):
            raise ConfigError(f"--warmup_epochs={self.warmup_epochs}: expected a number >= 0.")
        if self.train_steps is None and self.warmup_epochs > self.epochs:
            raise ConfigError(
                f"--warmup_epochs={self.warmup_epochs} is longer than the run "
                f"(--epochs={self.epochs}): expected at most {self.epochs}."
            )
        if any(b <= 0 for b in self.lr_decay_epochs):
            raise ConfigError(
                f"--lr_decay_epochs={','.join(map(str, self.lr_decay_epochs))}: "
                "expected positive epoch numbers."
            )
        if self.profile_steps and (
            len(self.profile_steps) != 2 or not 0 <= self.profile_steps[0] < self.profile_steps[1]
        ):
            raise ConfigError(
                f"--profile_steps={','.join(map(str, self.profile_steps))}: expected "
                "START,END with 0 <= START < END (the trace covers steps START+1 to END)."
            )
        if self.hidden_units is not None and self.builtin_task:
            if self.model != "mlp":
                raise ConfigError(
                    f"--hidden_units applies to --model=mlp, not --model={self.model}."
                )
            if not self.hidden_units or any(u <= 0 for u in self.hidden_units):
                raise ConfigError(
                    f"--hidden_units={','.join(map(str, self.hidden_units))}: "
                    "expected a comma-separated list of positive layer widths."
                )
        if self.embedding_shards is not None and self.builtin_task:
            _positive_int("embedding_shards", self.embedding_shards)
            if self.model != "embedding_bag":
                raise ConfigError(
                    f"--embedding_shards applies to --model=embedding_bag, not "
                    f"--model={self.model}."
                )
        if self.strategy != "model_parallel":
            for name in PIPELINE_FIELDS:
                if getattr(self, name) is not None:
                    raise ConfigError(
                        f"--{name} applies to --strategy=model_parallel only "
                        f"(got --strategy={self.strategy})."
                    )
        if self.pipeline_schedule is not None:
            _one_of("pipeline_schedule", self.pipeline_schedule, PIPELINE_SCHEDULES)
        if self.pipeline_balance is not None:
            _one_of("pipeline_balance", self.pipeline_balance, PIPELINE_BALANCES)
        check_batch_splits(self.batch_size, self.num_replicas, self.microbatches)
        if not self.model_dir:
            raise ConfigError(
                "--model_dir is required: the folder for this run's "
                "checkpoints, summaries, metrics and export."
            )
        return self


def check_batch_splits(
    batch_size: int, num_replicas: int, num_microbatches: int = 1, over: str = "replicas"
) -> None:
    """Raises ConfigError unless the global batch splits evenly over the
    replicas (or whatever ``over`` names: workers) and each share over the
    micro-batches."""
    if batch_size % num_replicas:
        raise ConfigError(
            f"--batch_size={batch_size} does not split evenly over {num_replicas} "
            f"{over}: expected a multiple of {num_replicas}."
        )
    if (batch_size // num_replicas) % num_microbatches:
        raise ConfigError(
            f"--batch_size={batch_size} does not split into {num_microbatches} "
            f"micro-batches on each of {num_replicas} {over}: expected a multiple "
            f"of {num_replicas * num_microbatches}."
        )


def _one_of(name: str, value: str, choices: tuple[str, ...], open_ended: bool = False):
    if not isinstance(value, str) or not value:
        raise ConfigError(f"--{name}={value!r}: expected one of {', '.join(choices)}.")
    if value in choices or open_ended:
        return
    raise ConfigError(f"--{name}={value}: expected one of {', '.join(choices)}.")


def _positive_int(name: str, value: Any):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"--{name}={value}: expected a positive integer.")


def _positive_float(name: str, value: Any):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"--{name}={value}: expected a number > 0.")
