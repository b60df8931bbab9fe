"""The command line: ``tftrain train`` and ``tftrain launch``.

Flags are defined inside ``define_*_flags`` functions, never at import, so
tests import everything without registering a flag. Every config field is a
flag of the same name; an experiment sets the defaults and any flag given on
the command line overrides them.
"""

from __future__ import annotations

import dataclasses
import os
import sys

USAGE = """usage: tftrain <command> [flags]

commands:
  train    train, evaluate and export a model (tftrain train --helpshort)
  launch   run a local cluster, one process per task (tftrain launch --helpshort)
"""

_HELP = {
    "experiment": "a named experiment from experiments/ (NAME or NAME:smoke); it "
    "sets the defaults of every other flag",
    "dataset": "fashion_mnist, mnist, cifar10, synthetic, or any TFDS name",
    "data_dir": "where local data lives (IDX files, or TFDS's data folder)",
    "max_train_examples": "use only the first N training examples",
    "max_eval_examples": "use only the first N test examples",
    "model": "softmax, mlp or cnn",
    "hidden_units": "the mlp's hidden layer widths, e.g. 256,128",
    "optimizer": "sgd, momentum, adagrad or adam (tftrain's own classes)",
    "learning_rate": "the (peak) learning rate, > 0",
    "momentum": "momentum for sgd/momentum (default 0.9 for momentum, 0 for sgd)",
    "lr_schedule": "constant, cosine or step (after any warm-up)",
    "warmup_epochs": "epochs of linear learning-rate warm-up",
    "lr_decay_epochs": "epochs where the step schedule decays, e.g. 30,60",
    "lr_decay_rate": "the step schedule's factor",
    "scale_lr_with_batch": "linear scaling rule: learning_rate * batch_size / base_batch_size",
    "base_batch_size": "the batch size --learning_rate is quoted for (with --scale_lr_with_batch)",
    "batch_size": "the global batch size, all replicas together",
    "eval_batch_size": "the global evaluation batch size",
    "epochs": "epochs to train",
    "train_steps": "steps to train; wins over --epochs",
    "steps_per_loop": "training steps run inside one tf.function call",
    "checkpoint_interval": "steps between checkpoints (default: one epoch)",
    "eval_interval": "steps between evaluations (default: one epoch)",
    "keep_checkpoints": "checkpoints kept in model_dir/checkpoints",
    "log_interval_secs": "seconds between progress lines",
    "strategy": "one_device, mirrored, multi_worker_mirrored, parameter_server, model_parallel",
    "num_replicas": "local replicas for mirrored: GPUs, or logical CPU devices",
    "all_reduce": "mirrored's cross-device reduction: auto, nccl, hierarchical_copy, "
    "reduction_to_one_device",
    "collective": "multi_worker_mirrored's collective implementation: auto, ring, nccl",
    "collective_timeout_secs": "a multi-worker run that makes no progress for this long "
    "fails with a message (a worker that died or never started)",
    "collective_pack_bytes": "multi_worker_mirrored: all-reduce gradients in packs of this "
    "many bytes (0: one pack)",
    "num_stages": "pipeline stages for model_parallel",
    "num_microbatches": "micro-batches per step for model_parallel",
    "model_dir": "the run's folder; a run resumes from the latest checkpoint there",
    "seed": "the same seed and flags give the same run",
    "export": "write a SavedModel to model_dir/export at the end",
}
_THREAD_FLAGS = {
    "intra_op_threads": (
        "TFTRAIN_INTRA_OP_THREADS",
        "threads inside one op (0: TensorFlow's default)",
    ),
    "inter_op_threads": ("TFTRAIN_INTER_OP_THREADS", "ops run at once (0: TensorFlow's default)"),
}


def define_train_flags(flag_values) -> None:
    """Defines one flag per ExperimentConfig field, on ``flag_values``."""
    from absl import flags

    from tftrain.config import ExperimentConfig

    for field in dataclasses.fields(ExperimentConfig):
        help_text = _HELP[field.name]
        kind = str(field.type)
        if kind.startswith("tuple["):
            flags.DEFINE_list(field.name, None, help_text, flag_values=flag_values)
        elif kind == "bool":
            flags.DEFINE_bool(field.name, None, help_text, flag_values=flag_values)
        elif kind.startswith("int"):
            flags.DEFINE_integer(field.name, None, help_text, flag_values=flag_values)
        elif kind.startswith("float"):
            flags.DEFINE_float(field.name, None, help_text, flag_values=flag_values)
        else:
            flags.DEFINE_string(field.name, None, help_text, flag_values=flag_values)
    for name, (env, help_text) in _THREAD_FLAGS.items():
        flags.DEFINE_integer(
            name,
            int(os.environ.get(env, "0") or 0),
            f"{help_text}; default from ${env}",
            lower_bound=0,
            flag_values=flag_values,
        )


def config_from_flags(flag_values):
    """The experiment's config with every flag given on the command line applied.

    Raises:
      ConfigError: for a bad value.
    """
    from tftrain import registry
    from tftrain.config import ConfigError, ExperimentConfig

    experiment = flag_values["experiment"].value
    config = registry.get(experiment) if experiment else ExperimentConfig()
    changes = {}
    for field in dataclasses.fields(ExperimentConfig):
        flag = flag_values[field.name]
        if not flag.present or field.name == "experiment":
            continue
        value = flag.value
        kind = str(field.type)
        if kind.startswith("tuple["):
            cast = int if kind.startswith("tuple[int") else float
            try:
                value = tuple(cast(v) for v in value)
            except ValueError:
                raise ConfigError(
                    f"--{field.name}={','.join(value)}: expected a "
                    f"comma-separated list of {cast.__name__}s."
                ) from None
        changes[field.name] = value
    return config.replace(**changes).validate()


def _fail(message: str, code: int = 2):
    print(f"tftrain: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _quiet_tensorflow() -> None:
    # TensorFlow's C++ start-up lines are noise to a person watching a run.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _train_main(argv):
    from absl import flags

    from tftrain.config import ConfigError
    from tftrain.data import DataError

    if len(argv) > 1:
        _fail(
            f"unexpected argument {argv[1]!r}: train takes flags only "
            "(see tftrain train --helpshort)."
        )
    flag_values = flags.FLAGS
    try:
        config = config_from_flags(flag_values)
        if os.path.exists(config.model_dir) and not os.path.isdir(config.model_dir):
            raise ConfigError(
                f"--model_dir={config.model_dir} is a file: expected a "
                "folder (new or from an earlier run)."
            )
        from tftrain.distribute import cluster as cluster_lib

        cluster = cluster_lib.from_environment(config.strategy)
    except (ConfigError, DataError) as e:
        _fail(str(e))
    _quiet_tensorflow()
    if not flag_values["verbosity"].present:
        from absl import logging

        logging.set_verbosity(logging.WARNING)
    import tensorflow as tf

    from tftrain import controller
    from tftrain.distribute import strategies
    from tftrain.distribute.watchdog import NoWatchdog, Watchdog

    watchdog = NoWatchdog()
    if config.strategy == "multi_worker_mirrored" and cluster and cluster.num_workers > 1:
        watchdog = Watchdog(config.collective_timeout_secs)
        watchdog.kick("waiting for every worker of the cluster to start")
    try:
        strategies.configure_threads(
            flag_values.intra_op_threads
            or strategies.default_intra_op_threads(config.strategy, config.num_replicas),
            flag_values.inter_op_threads,
            spinning=os.environ.get("TFTRAIN_THREAD_SPINNING", "1") != "0",
        )
        placement = strategies.create(
            config.strategy,
            num_replicas=config.num_replicas,
            all_reduce=config.all_reduce,
            collective=config.collective,
            collective_pack_bytes=config.collective_pack_bytes,
            cluster=cluster,
            ring_timeout_secs=config.collective_timeout_secs,
        )
        controller.run(config, placement, watchdog=watchdog)
        watchdog.stop()
    except (ConfigError, DataError, controller.RunError) as e:
        _fail(str(e))
    except OSError as e:  # the file system refused: unwritable model_dir, disk full
        where = f" ({e.filename})" if e.filename else ""
        _fail(f"{e.strerror or e}{where}: check --model_dir={config.model_dir}.")
    except (
        tf.errors.UnavailableError,
        tf.errors.DeadlineExceededError,
        tf.errors.CancelledError,
    ) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _fail(
            f"lost contact with another task of the cluster ({type(e).__name__}: "
            f"{first[:300]}): a worker died or never started.",
            code=1,
        )
    except tf.errors.OpError as e:
        if "RingError" not in str(e):
            raise
        # Raised inside the graph by tftrain's gradient ring: keep its own words.
        said = str(e).split("RingError:", 1)[-1].strip().splitlines()[0]
        _fail(f"lost contact with another worker: {said}", code=1)


def _run_absl(main, define, command: str, argv: list[str]) -> None:
    from absl import app, flags

    known = set(flags.FLAGS)
    define(flags.FLAGS)
    # --helpshort lists the main module's key flags: make the command's flags so.
    for name in sorted(set(flags.FLAGS) - known):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
    try:
        app.run(main, argv=[f"tftrain {command}", *argv])
    except KeyboardInterrupt:
        sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``tftrain`` console command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command == "train":
        from tftrain import _malloc

        _malloc.tune()  # before TensorFlow allocates anything
        _run_absl(_train_main, define_train_flags, "train", rest)
    elif command == "launch":
        from tftrain.distribute import launch

        _run_absl(launch.main, launch.define_flags, "launch", rest)
    else:
        print(
            f"tftrain: error: unknown command {command!r}: expected train or launch.\n",
            file=sys.stderr,
        )
        print(USAGE, end="", file=sys.stderr)
        sys.exit(2)
