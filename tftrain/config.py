"""The typed run configuration: every default in one place, validated once.

The CLI turns flags into an :class:`ExperimentConfig`; everything below the
CLI takes that object (or explicit arguments), never flags.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

DATASETS_BUILTIN = ("fashion_mnist", "mnist", "cifar10", "synthetic")
MODELS = ("softmax", "mlp", "cnn")
OPTIMIZERS = ("sgd", "momentum", "adagrad", "adam")
STRATEGIES = (
    "one_device",
    "mirrored",
    "multi_worker_mirrored",
    "parameter_server",
    "model_parallel",
)
# Strategies this version runs; the others are accepted names whose
# support is still being built, and are refused with a clear message.
STRATEGIES_AVAILABLE = ("one_device", "mirrored", "multi_worker_mirrored")
LR_SCHEDULES = ("constant", "cosine", "step")
ALL_REDUCE = ("auto", "nccl", "hierarchical_copy", "reduction_to_one_device", "ring")
COLLECTIVES = ("auto", "tcp", "ring", "nccl")


class ConfigError(ValueError):
    """A user-facing configuration mistake: one clear message, no traceback."""


@dataclasses.dataclass
class ExperimentConfig:
    """Everything a training run needs to know.

    Field names are the flag names, and the TensorBoard tags use the same
    words, so one idea has one name everywhere.
    """

    experiment: str | None = None
    # Data.
    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    max_train_examples: int | None = None  # a subset, for smoke runs
    max_eval_examples: int | None = None
    # Model and optimizer.
    model: str = "softmax"
    hidden_units: tuple[int, ...] = (256, 128)  # the mlp's hidden layers
    optimizer: str = "adam"
    learning_rate: float = 0.001
    momentum: float | None = None  # None: 0.9 for `momentum`, 0 for `sgd`
    lr_schedule: str = "constant"
    warmup_epochs: float = 0.0
    lr_decay_epochs: tuple[float, ...] = ()  # boundaries for the step schedule
    lr_decay_rate: float = 0.1
    scale_lr_with_batch: bool = False  # linear scaling rule (Goyal et al.)
    base_batch_size: int = 256  # the batch the learning rate is quoted for
    # Schedule of the run.
    batch_size: int = 100  # global: all replicas together
    eval_batch_size: int = 1000
    epochs: int = 1
    train_steps: int | None = None  # wins over epochs when given
    steps_per_loop: int = 100
    checkpoint_interval: int | None = None  # steps; None: once an epoch
    eval_interval: int | None = None  # steps; None: once an epoch
    keep_checkpoints: int = 3
    log_interval_secs: float = 5.0
    # Distribution.
    strategy: str = "one_device"
    num_replicas: int = 1
    all_reduce: str = "auto"
    collective: str = "auto"
    collective_timeout_secs: float = 300.0
    # Gradients all-reduced in packs of this many bytes. TensorFlow's gRPC
    # collectives are ~2x faster on 256 KiB packs than on one 0.9 MB message
    # (benchmarks/allreduce.py); 0 sends one pack.
    collective_pack_bytes: int = 256 * 1024
    num_stages: int = 2
    num_microbatches: int = 4
    # Output and reproducibility.
    model_dir: str | None = None
    seed: int = 0
    export: bool = True

    def replace(self, **changes: Any) -> ExperimentConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> ExperimentConfig:
        """Checks every field; raises ConfigError naming the first bad one."""
        _one_of("dataset", self.dataset, DATASETS_BUILTIN, open_ended=True)
        _one_of("model", self.model, MODELS)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("strategy", self.strategy, STRATEGIES)
        _one_of("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _one_of("all_reduce", self.all_reduce, ALL_REDUCE)
        _one_of("collective", self.collective, COLLECTIVES)
        _positive_float("learning_rate", self.learning_rate)
        _positive_int("batch_size", self.batch_size)
        _positive_int("eval_batch_size", self.eval_batch_size)
        _positive_int("epochs", self.epochs)
        _positive_int("steps_per_loop", self.steps_per_loop)
        _positive_int("keep_checkpoints", self.keep_checkpoints)
        _positive_int("num_replicas", self.num_replicas)
        _positive_int("base_batch_size", self.base_batch_size)
        _positive_float("collective_timeout_secs", self.collective_timeout_secs)
        for name in (
            "train_steps",
            "checkpoint_interval",
            "eval_interval",
            "max_train_examples",
            "max_eval_examples",
        ):
            value = getattr(self, name)
            if value is not None:
                _positive_int(name, value)
        if isinstance(self.collective_pack_bytes, bool) or self.collective_pack_bytes < 0:
            raise ConfigError(
                f"--collective_pack_bytes={self.collective_pack_bytes}: expected an "
                "integer >= 0 (0: one pack)."
            )
        if self.momentum is not None and not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"--momentum={self.momentum}: expected a number in [0, 1).")
        if not 0.0 < self.lr_decay_rate <= 1.0:
            raise ConfigError(f"--lr_decay_rate={self.lr_decay_rate}: expected a number in (0, 1].")
        if self.warmup_epochs < 0 or not math.isfinite(self.warmup_epochs):
            raise ConfigError(f"--warmup_epochs={self.warmup_epochs}: expected a number >= 0.")
        if any(b <= 0 for b in self.lr_decay_epochs):
            raise ConfigError(
                f"--lr_decay_epochs={','.join(map(str, self.lr_decay_epochs))}: "
                "expected positive epoch numbers."
            )
        if not self.hidden_units or any(u <= 0 for u in self.hidden_units):
            raise ConfigError(
                f"--hidden_units={','.join(map(str, self.hidden_units))}: "
                "expected a comma-separated list of positive layer widths."
            )
        if self.strategy != "mirrored" and self.num_replicas != 1:
            raise ConfigError(
                f"--num_replicas={self.num_replicas} applies to "
                f"--strategy=mirrored only (got --strategy={self.strategy})."
            )
        check_batch_splits(self.batch_size, self.num_replicas)
        if self.strategy not in STRATEGIES_AVAILABLE:
            raise ConfigError(
                f"--strategy={self.strategy} is not available in this version "
                f"of tftrain yet; available: {', '.join(STRATEGIES_AVAILABLE)}."
            )
        if not self.model_dir:
            raise ConfigError(
                "--model_dir is required: the folder for this run's "
                "checkpoints, summaries, metrics and export."
            )
        return self


def check_batch_splits(batch_size: int, num_replicas: int) -> None:
    """Raises ConfigError unless the global batch splits evenly over the replicas."""
    if batch_size % num_replicas:
        raise ConfigError(
            f"--batch_size={batch_size} does not split evenly over {num_replicas} "
            f"replicas: expected a multiple of {num_replicas}."
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
