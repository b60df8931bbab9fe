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
PRECISIONS = ("float32", "bfloat16", "float64")
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
# What a resumed run may change: how long it trains, where its data and files
# are, how it runs in parallel (the README's equivalences), threads, and what
# it logs, evaluates and keeps. Every other field is the run's identity: kept
# in its checkpoints and compared on resume (controller.Controller.restore).
MAY_CHANGE_ON_RESUME = frozenset(
    {
        "epochs",
        "train_steps",
        "experiment_source",
        "data_dir",
        "max_eval_examples",
        "eval_batch_size",
        "embedding_shards",
        "strategy",
        "num_replicas",
        "all_reduce",
        "collective",
        "collective_timeout_secs",
        "ring_port",
        "slurm_ps",
        "slurm_port_base",
        "collective_pack_bytes",
        "num_stages",
        "pipeline_schedule",
        "pipeline_balance",
        "intra_op_threads",
        "inter_op_threads",
        "thread_spinning",
        "steps_per_loop",
        "checkpoint_interval",
        "eval_interval",
        "keep_checkpoints",
        "log_interval_secs",
        "summary_every",
        "histogram_every",
        "profile_steps",
        "on_nan",
        "model_dir",
        "restart",
        "export",
    }
)


def _flag(default, help: str):
    """A field that is a flag of the same name; ``help`` is its help, where
    ``{name}`` lists the choices of :func:`_choices`."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("a flag's default must be immutable")
    return dataclasses.field(default=default, metadata={"help": help})


def _choices() -> dict[str, str]:
    """The choices a field's help may name: the registries' current names
    (a strategy registered later is listed too) and the closed lists here."""
    return {
        name: ", ".join(values)
        for name, values in {
            "datasets": DATASETS_BUILTIN,
            "models": plugins.MODELS.names(),
            "optimizers": plugins.OPTIMIZERS.names(),
            "strategies": plugins.STRATEGIES.names(),
            "precisions": PRECISIONS,
            "lr_schedules": LR_SCHEDULES,
            "on_nan": ON_NAN,
            "all_reduce": ALL_REDUCE,
            "collectives": COLLECTIVES,
            "pipeline_schedules": PIPELINE_SCHEDULES,
            "pipeline_balances": PIPELINE_BALANCES,
        }.items()
    }


def field_help(field: dataclasses.Field) -> str:
    """A field's flag help, its choices filled in."""
    return field.metadata.get("help", field.name).format(**_choices())


@dataclasses.dataclass
class ExperimentConfig:
    """Everything a training run needs to know.

    Field names are the flag names, and the TensorBoard tags use the same
    words, so one idea has one name everywhere.
    """

    experiment: str | None = _flag(
        None,
        "an experiment: NAME[:VARIANT] from experiments/, a file (path/to/exp.py[:VARIANT]) "
        "or a module (package.module[:VARIANT]) with get_config(variant); it sets the "
        "defaults of every other flag, and its own options are flags too",
    )
    # Where the experiment came from (a file's absolute path, or a module's
    # name): recorded in config.json; set when the experiment is loaded.
    experiment_source: str | None = dataclasses.field(default=None, metadata={"flag": False})
    # The user's own options (name -> default): each is a flag of its own
    # (--name=value), recorded in config.json, read as config.name.
    options: dict = dataclasses.field(default_factory=dict, metadata={"flag": False})
    # -- data and task
    dataset: str = _flag("fashion_mnist", "the built-in task's data: {datasets}, or any TFDS name")
    data_dir: str | None = _flag(None, "where local data lives (IDX files, or TFDS's data folder)")
    max_train_examples: int | None = _flag(None, "use only the first N training examples")
    max_eval_examples: int | None = _flag(None, "use only the first N test examples")
    # A tftrain.Task subclass, or the name of a registered one.
    task: Any = dataclasses.field(default="classification", metadata={"flag": False})
    # -- model and optimizer
    model: str = _flag("softmax", "the built-in task's model: {models}")
    hidden_units: tuple[int, ...] | None = _flag(
        None, "the mlp's hidden layer widths (default 256,128)"
    )
    embedding_shards: int | None = _flag(
        None,
        "embedding_bag: keep the table as this many variables of consecutive rows, which "
        "parameter servers share out (default 1)",
    )
    precision: str = _flag(
        "float32",
        "{precisions}: bfloat16 computes the layers in bfloat16 (Keras's mixed_bfloat16 "
        "policy) and keeps the variables, gradients' updates and the loss in float32",
    )
    optimizer: str = _flag("adam", "{optimizers} (tftrain's own classes)")
    learning_rate: float = _flag(0.001, "the (peak) learning rate, > 0")
    momentum: float | None = _flag(
        None, "momentum for sgd/momentum (default 0.9 for momentum, 0 for sgd)"
    )
    nesterov: bool = _flag(
        False, "Nesterov momentum for --optimizer=momentum (or sgd with --momentum)"
    )
    weight_decay: float = _flag(
        0.0,
        "decoupled weight decay (AdamW with --optimizer=adam): each step every weight "
        "w <- w - learning_rate * weight_decay * w, before the update; biases and "
        "normalization layers' scales and offsets (variables of rank 0 or 1, and any "
        "variable named bias) are left "
        "out, and so are those --weight_decay_exclude names (0: none)",
    )
    weight_decay_exclude: tuple[str, ...] = _flag(
        (),
        "regular expressions of variable paths (layer/name) also left out of "
        "--weight_decay, e.g. embeddings",
    )
    clip_norm: float | None = _flag(
        None,
        "clip each update's gradients, summed over every replica and worker, to this "
        "global norm (default: no clipping)",
    )
    sync_batchnorm: bool = _flag(
        False,
        "BatchNormalization layers normalize with the statistics of the global batch, "
        "all-reduced over every replica and worker at each training step (Keras's "
        "synchronized=True); without it each replica uses its own share's",
    )
    lr_schedule: str = _flag("constant", "{lr_schedules} (after any warm-up)")
    warmup_epochs: float = _flag(0.0, "epochs of linear learning-rate warm-up")
    lr_decay_epochs: tuple[float, ...] = _flag(
        (), "epochs where the step schedule decays, e.g. 30,60"
    )
    lr_decay_rate: float = _flag(0.1, "the step schedule's factor")
    scale_lr_with_batch: bool = _flag(
        False, "linear scaling rule: learning_rate * batch_size / base_batch_size"
    )
    base_batch_size: int = _flag(
        256, "the batch size --learning_rate is quoted for (with --scale_lr_with_batch)"
    )
    # -- the schedule of the run
    batch_size: int = _flag(100, "the global batch size, all replicas together")
    num_microbatches: int | None = _flag(
        None,
        "gradient accumulation: each replica's batch is cut into this many slices, whose "
        "gradients are summed before one update (default 1; under model_parallel, the "
        "pipeline's micro-batches: 4 per stage where the batch splits so)",
    )
    eval_batch_size: int = _flag(1000, "the global evaluation batch size")
    epochs: int = _flag(1, "epochs to train")
    train_steps: int | None = _flag(None, "steps to train; wins over --epochs")
    steps_per_epoch: int | None = _flag(
        None,
        "training steps in one pass over the data (default: the training dataset's "
        "length when it is known)",
    )
    steps_per_loop: int = _flag(100, "training steps run inside one tf.function call")
    checkpoint_interval: int | None = _flag(None, "steps between checkpoints (default: one epoch)")
    eval_interval: int | None = _flag(None, "steps between evaluations (default: one epoch)")
    keep_checkpoints: int = _flag(3, "checkpoints kept in model_dir/checkpoints")
    log_interval_secs: float = _flag(5.0, "seconds between progress lines")
    summary_every: int | None = _flag(
        None,
        "steps between TensorBoard train scalars and progress checks (default: after "
        "every --steps_per_loop steps)",
    )
    histogram_every: int | None = _flag(
        None,
        "steps between histograms of the weights and of one training batch's gradients "
        "(default: none)",
    )
    profile_steps: tuple[int, ...] = _flag(
        (),
        "START,END: a profiler trace of steps START+1 to END, for TensorBoard's Profile "
        "tab (default: none)",
    )
    on_nan: str = _flag(
        "stop",
        "{on_nan}: when the loss or the gradients' norm is NaN or infinite, stop the run "
        "(naming the steps and the last good checkpoint, exporting nothing) or skip that "
        "update (counted as train/skipped_steps)",
    )
    # -- distribution
    strategy: str = _flag("one_device", "{strategies}")
    num_replicas: int = _flag(1, "local replicas for mirrored: GPUs, or logical CPU devices")
    all_reduce: str = _flag("auto", "mirrored's cross-device reduction: {all_reduce}")
    collective: str = _flag(
        "auto",
        "multi_worker_mirrored's gradient all-reduce: {collectives} (auto: tcp on CPU "
        "workers, TensorFlow's choice on GPUs; tcp: tftrain's ring over TCP; grpc: "
        "TensorFlow's ring over gRPC)",
    )
    collective_timeout_secs: float = _flag(
        300.0,
        "a multi-worker run that makes no progress for this long fails with a message (a "
        "worker that died or never started)",
    )
    ring_port: int = _flag(
        0,
        "multi_worker_mirrored with the tcp collective: the port tftrain's gradient ring "
        "listens on, on each worker's TF_CONFIG host (0: a free port)",
    )
    slurm_ps: int = _flag(
        0,
        "under srun, --strategy=parameter_server: how many of the step's tasks are parameter "
        "servers (rank 0 is the chief, then these, then the workers)",
    )
    slurm_port_base: int = _flag(
        0,
        "under srun: the port of each node's first task, the next ones above it (0: from the "
        "job id, in 20000-59999)",
    )
    # ~2x faster on 256 KiB packs than on one 0.9 MB message (benchmarks/allreduce.py).
    collective_pack_bytes: int = _flag(
        256 * 1024,
        "grpc/nccl collectives: all-reduce gradients in packs of this many bytes (0: one pack)",
    )
    num_stages: int | None = _flag(
        None,
        "model_parallel: pipeline stages, each a run of consecutive layers on its own "
        "device (default 2)",
    )
    pipeline_schedule: str | None = _flag(
        None,
        "model_parallel: {pipeline_schedules} (default gpipe; 1f1b holds fewer "
        "micro-batches' activations)",
    )
    pipeline_balance: str | None = _flag(
        None,
        "model_parallel: balance stages by {pipeline_balances} (default time: each layer's "
        "measured forward+backward time; params: parameter count)",
    )
    # -- this process
    intra_op_threads: int = _flag(0, "threads inside one op (0: the strategy's default)")
    inter_op_threads: int = _flag(0, "ops run at once (0: the strategy's default)")
    thread_spinning: bool = _flag(
        True, "let idle TensorFlow threads spin for work (off when tasks share cores)"
    )
    # -- output and reproducibility
    model_dir: str | None = _flag(
        None, "the run's folder; a run resumes from the latest checkpoint there"
    )
    restart: bool = _flag(
        False,
        "start from step 0: the earlier run's files in --model_dir are moved into "
        "model_dir/previous/N/ first (nothing is deleted)",
    )
    seed: int = _flag(0, "the same seed and flags give the same run")
    export: bool = _flag(True, "write a SavedModel to model_dir/export at the end")

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
            import difflib

            close = difflib.get_close_matches(unknown[0], [*names, *self.options], n=1)
            raise ConfigError(
                f"{unknown[0]!r} is neither a field of ExperimentConfig nor one of this "
                "experiment's options"
                + (f" ({', '.join(self.options)})" if self.options else "")
                + (f"; did you mean {close[0]!r}?" if close else ".")
            )
        for name, value in options.items():  # of the kind of the experiment's default
            _check_kind(name, value, value_kind(self.options[name]), option=True)
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

    def identity(self) -> dict[str, Any]:
        """The fields that make this run this run (see MAY_CHANGE_ON_RESUME)."""
        return {k: v for k, v in self.to_dict().items() if k not in MAY_CHANGE_ON_RESUME}

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

    def _check_types(self) -> None:
        """Each flag field and option holds a value of its kind, as the
        command line would give it (from Python, nothing else checks)."""
        import os

        for field in dataclasses.fields(self):
            if not field.metadata.get("flag", True):
                continue
            value = getattr(self, field.name)
            if isinstance(value, os.PathLike) and str(field.type).startswith("str"):
                value = os.fspath(value)  # a pathlib.Path for a folder: its string
                setattr(self, field.name, value)
            _check_kind(field.name, value, str(field.type))

    def validate(self) -> ExperimentConfig:
        """Checks every field and their combinations; raises ConfigError naming
        the first bad one. The strategy's own checks follow in its module."""
        from tftrain.tasks import Task

        self._check_types()
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
        else:
            # The built-in task's fields mean nothing to a task of one's own:
            # a value given for one would be silently ignored.
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for name in BUILTIN_TASK_FIELDS:
                if getattr(self, name) != defaults[name]:
                    raise ConfigError(
                        f"--{name} applies to the built-in task only: "
                        f"{getattr(self.task, '__name__', self.task)} builds its own model "
                        "and data (its own options are listed by --helpshort)."
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
        if self.slurm_ps < 0:
            raise ConfigError(f"--slurm_ps={self.slurm_ps}: expected 0 or more.")
        if self.slurm_port_base and not 1024 <= self.slurm_port_base <= 65000:
            raise ConfigError(
                f"--slurm_port_base={self.slurm_port_base}: expected 0 (from the job id) "
                "or 1024-65000."
            )
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
        if self.weight_decay < 0 or not math.isfinite(self.weight_decay):
            raise ConfigError(f"--weight_decay={self.weight_decay}: expected a number >= 0.")
        if self.clip_norm is not None and not (
            math.isfinite(self.clip_norm) and self.clip_norm > 0
        ):
            raise ConfigError(f"--clip_norm={self.clip_norm}: expected a number > 0.")
        if self.weight_decay_exclude:
            import re

            for pattern in self.weight_decay_exclude:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ConfigError(
                        f"--weight_decay_exclude={pattern}: not a regular expression ({e})."
                    ) from None
        if self.momentum is not None:
            if self.optimizer not in ("sgd", "momentum"):
                raise ConfigError(
                    f"--momentum applies to --optimizer=sgd or momentum, not "
                    f"--optimizer={self.optimizer}: drop --momentum or change the optimizer."
                )
            if not 0.0 <= self.momentum < 1.0:
                raise ConfigError(f"--momentum={self.momentum}: expected a number in [0, 1).")
        if self.nesterov and self.optimizer not in ("sgd", "momentum"):
            raise ConfigError(
                f"--nesterov applies to --optimizer=momentum (or sgd with --momentum), not "
                f"--optimizer={self.optimizer}."
            )
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


def value_kind(default) -> str:
    """The kind of an option, from its default: bool, int, float, str,
    tuple, or Any (None or anything else)."""
    for kind in (bool, int, float, str):
        if isinstance(default, kind):
            return kind.__name__
    return "tuple" if isinstance(default, (tuple, list)) else "Any"


def field_kind(annotation: str) -> str:
    """The kind of a field, from its annotation (``int | None``,
    ``tuple[float, ...]``): bool, int, float, str, tuple, or Any."""
    kind = annotation.split("|")[0].strip().split("[")[0]
    return kind if kind in _KIND_WORDS else "Any"


_KIND_WORDS = {
    "bool": "true or false",
    "int": "a whole number",
    "float": "a number",
    "str": "a string",
    "tuple": "a list (tuple)",
}


def _check_kind(name: str, value, annotation: str, option: bool = False) -> None:
    """Raises ConfigError when ``value`` is not of the kind ``annotation``
    names (``int``, ``float | None``, ``tuple[int, ...]``, ...)."""
    if value is None and ("None" in annotation or annotation == "Any"):
        return
    kind = field_kind(annotation)
    if kind == "Any":
        return
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "tuple": isinstance(value, (tuple, list)),
    }[kind]
    if not ok:
        what = "the experiment's option" if option else "the field"
        raise ConfigError(
            f"{name}={value!r} ({type(value).__name__}): {what} {name} takes "
            f"{_KIND_WORDS[kind]} (the flag --{name})."
        )
