"""The training flags: one per ExperimentConfig field (its help beside the
field, or in the table below), one per option of the experiment, and the
config they make. Shared by ``tftrain train`` (:mod:`tftrain.cli`) and
``tftrain launch`` (:mod:`tftrain.distribute.launch`), which checks a run's
flags as its tasks will; neither imports the other for them.
"""

from __future__ import annotations

import dataclasses
import os
import sys


def _choices(names) -> str:
    return ", ".join(names)


def _help() -> dict[str, str]:
    """Each flag's help; lists of choices come from where they are defined."""
    from tftrain import config as c
    from tftrain import plugins

    return {
        "experiment": "an experiment: NAME[:VARIANT] from experiments/, a file "
        "(path/to/exp.py[:VARIANT]) or a module (package.module[:VARIANT]) with "
        "get_config(variant); it sets the defaults of every other flag, and its own "
        "options are flags too",
        "dataset": f"the built-in task's data: {_choices(c.DATASETS_BUILTIN)}, or any TFDS name",
        "data_dir": "where local data lives (IDX files, or TFDS's data folder)",
        "max_train_examples": "use only the first N training examples",
        "max_eval_examples": "use only the first N test examples",
        "model": f"the built-in task's model: {_choices(plugins.MODELS.names())}",
        "hidden_units": "the mlp's hidden layer widths (default 256,128)",
        "embedding_shards": "embedding_bag: keep the table as this many variables of "
        "consecutive rows, which parameter servers share out (default 1)",
        "precision": f"{_choices(c.PRECISIONS)}: bfloat16 computes the layers in bfloat16 "
        "(Keras's mixed_bfloat16 policy) and keeps the variables, gradients' updates and "
        "the loss in float32",
        "optimizer": f"{_choices(plugins.OPTIMIZERS.names())} (tftrain's own classes)",
        "learning_rate": "the (peak) learning rate, > 0",
        "momentum": "momentum for sgd/momentum (default 0.9 for momentum, 0 for sgd)",
        "lr_schedule": f"{_choices(c.LR_SCHEDULES)} (after any warm-up)",
        "warmup_epochs": "epochs of linear learning-rate warm-up",
        "lr_decay_epochs": "epochs where the step schedule decays, e.g. 30,60",
        "lr_decay_rate": "the step schedule's factor",
        "scale_lr_with_batch": "linear scaling rule: learning_rate * batch_size / base_batch_size",
        "base_batch_size": "the batch size --learning_rate is quoted for "
        "(with --scale_lr_with_batch)",
        "batch_size": "the global batch size, all replicas together",
        "num_microbatches": "gradient accumulation: each replica's batch is cut into this "
        "many slices, whose gradients are summed before one update (default 1; under "
        "model_parallel, the pipeline's micro-batches: 4 per stage where the batch splits so)",
        "eval_batch_size": "the global evaluation batch size",
        "epochs": "epochs to train",
        "train_steps": "steps to train; wins over --epochs",
        "steps_per_loop": "training steps run inside one tf.function call",
        "checkpoint_interval": "steps between checkpoints (default: one epoch)",
        "eval_interval": "steps between evaluations (default: one epoch)",
        "keep_checkpoints": "checkpoints kept in model_dir/checkpoints",
        "log_interval_secs": "seconds between progress lines",
        "summary_every": "steps between TensorBoard train scalars and progress checks "
        "(default: after every --steps_per_loop steps)",
        "histogram_every": "steps between histograms of the weights and of one training "
        "batch's gradients (default: none)",
        "profile_steps": "START,END: a profiler trace of steps START+1 to END, for "
        "TensorBoard's Profile tab (default: none)",
        "on_nan": f"{_choices(c.ON_NAN)}: when the loss or the gradients' norm is NaN or "
        "infinite, stop the run (naming the steps and the last good checkpoint, exporting "
        "nothing) or skip that update (counted as train/skipped_steps)",
        "strategy": _choices(plugins.STRATEGIES.names()),
        "num_replicas": "local replicas for mirrored: GPUs, or logical CPU devices",
        "all_reduce": f"mirrored's cross-device reduction: {_choices(c.ALL_REDUCE)}",
        "collective": "multi_worker_mirrored's gradient all-reduce: "
        f"{_choices(c.COLLECTIVES)} (auto: tcp on CPU workers, TensorFlow's choice on GPUs; "
        "tcp: tftrain's ring over TCP; grpc: TensorFlow's ring over gRPC)",
        "collective_timeout_secs": "a multi-worker run that makes no progress for this long "
        "fails with a message (a worker that died or never started)",
        "ring_port": "multi_worker_mirrored with the tcp collective: the port tftrain's "
        "gradient ring listens on, on each worker's TF_CONFIG host (0: a free port)",
        "collective_pack_bytes": "grpc/nccl collectives: all-reduce gradients in packs of "
        "this many bytes (0: one pack)",
        "num_stages": "model_parallel: pipeline stages, each a run of consecutive layers on "
        "its own device (default 2)",
        "pipeline_schedule": f"model_parallel: {_choices(c.PIPELINE_SCHEDULES)} (default gpipe; "
        "1f1b holds fewer micro-batches' activations)",
        "pipeline_balance": f"model_parallel: balance stages by {_choices(c.PIPELINE_BALANCES)} "
        "(default time: each layer's measured forward+backward time; params: parameter count)",
        "intra_op_threads": "threads inside one op (0: the strategy's default)",
        "inter_op_threads": "ops run at once (0: the strategy's default)",
        "thread_spinning": "let idle TensorFlow threads spin for work (off when tasks share cores)",
        "model_dir": "the run's folder; a run resumes from the latest checkpoint there",
        "restart": "start from step 0: the earlier run's files in --model_dir are moved "
        "into model_dir/previous/N/ first (nothing is deleted)",
        "seed": "the same seed and flags give the same run",
        "export": "write a SavedModel to model_dir/export at the end",
    }


def _is_flag(field) -> bool:
    return field.metadata.get("flag", True)


def _define(name: str, kind: str, help_text: str, flag_values, default=None) -> None:
    from absl import flags

    if "tuple[" in kind or kind in ("tuple", "list"):
        flags.DEFINE_list(name, default, help_text, flag_values=flag_values)
    elif kind == "bool":
        flags.DEFINE_bool(name, default, help_text, flag_values=flag_values)
    elif kind.startswith("int"):
        flags.DEFINE_integer(name, default, help_text, flag_values=flag_values)
    elif kind.startswith("float"):
        flags.DEFINE_float(name, default, help_text, flag_values=flag_values)
    else:
        flags.DEFINE_string(name, default, help_text, flag_values=flag_values)


def define_train_flags(flag_values) -> None:
    """Defines one flag per ExperimentConfig field, on ``flag_values``; its
    help is the field's own (``metadata["help"]``) or the table above."""
    from tftrain.config import ExperimentConfig

    helps = _help()
    for field in dataclasses.fields(ExperimentConfig):
        if not _is_flag(field):
            continue
        help_text = field.metadata.get("help") or helps.get(field.name) or field.name
        _define(field.name, str(field.type), help_text, flag_values)


def experiment_in(argv: list[str]) -> str | None:
    """The value of ``--experiment`` in ``argv`` (the last one given), if any."""
    found = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg.startswith("--experiment="):
            found = arg.split("=", 1)[1]
        elif arg == "--experiment" and i + 1 < len(argv):
            found = argv[i + 1]
    return found


def define_option_flags(config, flag_values, key_flags: bool = True) -> None:
    """One flag per option of the experiment (``config.options``), typed by
    its default."""
    from tftrain.config import ConfigError

    for name, default in config.options.items():
        if name in flag_values:
            raise ConfigError(
                f"the experiment's option {name!r} has the name of one of tftrain's own "
                "flags: rename the option."
            )
        if isinstance(default, bool):
            kind = "bool"
        elif isinstance(default, int):
            kind = "int"
        elif isinstance(default, float):
            kind = "float"
        elif isinstance(default, (tuple, list)):
            kind = "list"
        else:
            kind = "str"
        value = [str(v) for v in default] if kind == "list" else default
        _define(name, kind, f"the experiment's option (default {default!r})", flag_values, value)
        if key_flags:  # listed by --helpshort
            flag_values.register_key_flag_for_module(sys.argv[0], flag_values[name])


def _option_value(name: str, default, flag):
    from tftrain.config import ConfigError

    value = flag.value
    if isinstance(default, (tuple, list)) and default:
        cast = type(default[0])
        try:
            value = type(default)(cast(v) for v in value)
        except ValueError:
            raise ConfigError(
                f"--{name}={','.join(value)}: expected a comma-separated list of {cast.__name__}s."
            ) from None
    return value


def config_from_flags(flag_values, loaded=None):
    """The experiment's config with every flag given on the command line applied.

    Raises:
      ConfigError: for a bad value.
    """
    from tftrain import registry
    from tftrain.config import ConfigError, ExperimentConfig

    experiment = flag_values["experiment"].value
    if loaded is not None:
        config = loaded
    else:
        config = registry.get(experiment) if experiment else ExperimentConfig()
    changes = {}
    for field in dataclasses.fields(ExperimentConfig):
        if not _is_flag(field):
            continue
        flag = flag_values[field.name]
        if not flag.present or field.name == "experiment":
            continue
        value = flag.value
        kind = str(field.type)
        if "tuple[" in kind:
            cast = int if kind.startswith("tuple[int") else float
            try:
                value = tuple(cast(v) for v in value)
            except ValueError:
                raise ConfigError(
                    f"--{field.name}={','.join(value)}: expected a "
                    f"comma-separated list of {cast.__name__}s."
                ) from None
        changes[field.name] = value
    options = {
        name: _option_value(name, default, flag_values[name])
        for name, default in config.options.items()
        if name in flag_values and flag_values[name].present
    }
    if options:
        changes["options"] = {**config.options, **options}
    return config.replace(**changes).validate()


def fail(message: str, code: int = 2):
    print(f"tftrain: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def user_code_failed(error) -> None:
    """The user's traceback (their bug to read), then tftrain's one line."""
    import traceback

    cause = error.error
    here = os.path.dirname(os.path.abspath(__file__))  # tftrain's own folder
    tb = cause.__traceback__
    # From the first frame of theirs: tftrain's own frames above it are not their concern.
    while (
        tb is not None
        and tb.tb_next is not None
        and tb.tb_frame.f_code.co_filename.startswith(here)
    ):
        tb = tb.tb_next
    traceback.print_exception(type(cause), cause, tb, file=sys.stderr)
    fail(str(error))
