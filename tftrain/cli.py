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


def _choices(names) -> str:
    return ", ".join(names)


def _help() -> dict[str, str]:
    """Each flag's help; lists of choices come from where they are defined."""
    from tftrain import config as c
    from tftrain import plugins

    return {
        "experiment": "a named experiment from experiments/ (NAME or NAME:smoke); it "
        "sets the defaults of every other flag",
        "dataset": f"{_choices(c.DATASETS_BUILTIN)}, or any TFDS name",
        "data_dir": "where local data lives (IDX files, or TFDS's data folder)",
        "max_train_examples": "use only the first N training examples",
        "max_eval_examples": "use only the first N test examples",
        "task": f"what is learned: {_choices(plugins.TASKS.names())}",
        "model": _choices(plugins.MODELS.names()),
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


def define_train_flags(flag_values) -> None:
    """Defines one flag per ExperimentConfig field, on ``flag_values``."""
    from absl import flags

    from tftrain.config import ExperimentConfig

    helps = _help()
    for field in dataclasses.fields(ExperimentConfig):
        help_text = helps[field.name]
        kind = str(field.type)
        if "tuple[" in kind:
            flags.DEFINE_list(field.name, None, help_text, flag_values=flag_values)
        elif kind == "bool":
            flags.DEFINE_bool(field.name, None, help_text, flag_values=flag_values)
        elif kind.startswith("int"):
            flags.DEFINE_integer(field.name, None, help_text, flag_values=flag_values)
        elif kind.startswith("float"):
            flags.DEFINE_float(field.name, None, help_text, flag_values=flag_values)
        else:
            flags.DEFINE_string(field.name, None, help_text, flag_values=flag_values)


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
    return config.replace(**changes).validate()


def _fail(message: str, code: int = 2):
    print(f"tftrain: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _leave(code: int) -> None:
    """Exits now with ``code``, without waiting for TensorFlow's threads."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _quiet_tensorflow(verbose: bool = False) -> None:
    # TensorFlow's C++ start-up lines are noise to a person watching a run.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not verbose:
        from tftrain import quiet

        quiet.filter_native_stderr()


def load_run(flag_values):
    """The config, the cluster and the parallel mode, all checked: every
    validation happens here, before anything starts.

    Raises:
      ConfigError: for the first thing that is wrong.
    """
    from tftrain.config import ConfigError
    from tftrain.distribute import base
    from tftrain.distribute import cluster as cluster_lib

    config = config_from_flags(flag_values)
    if os.path.exists(config.model_dir) and not os.path.isdir(config.model_dir):
        raise ConfigError(
            f"--model_dir={config.model_dir} is a file: expected a "
            "folder (new or from an earlier run)."
        )
    cluster = cluster_lib.from_environment()
    if config.restart and cluster is not None:
        raise ConfigError(
            "--restart moves the earlier run's files, which one task of a cluster "
            "cannot do for the others: use tftrain launch ... -- --restart, or move "
            f"{config.model_dir} away yourself."
        )
    return config, cluster, base.mode_for(config, cluster)


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
        config, cluster, mode = load_run(flag_values)
    except (ConfigError, DataError) as e:
        _fail(str(e))
    _quiet_tensorflow(verbose=flag_values["verbosity"].present)
    if not flag_values["verbosity"].present:
        from absl import logging

        logging.set_verbosity(logging.WARNING)
    import tensorflow as tf

    from tftrain import controller, resources
    from tftrain.distribute.watchdog import NoWatchdog
    from tftrain.errors import RunError
    from tftrain.stopping import Stopped, StopRequest

    if config.restart:
        from tftrain import checkpoints

        try:
            aside = checkpoints.set_aside_run(config.model_dir)
        except ConfigError as e:
            _fail(str(e))
        if aside:
            print(f"--restart: moved the earlier run's files to {aside}.", flush=True)
    stop = StopRequest().install()  # again once the strategy exists: see below
    watchdog = NoWatchdog()
    try:
        intra, inter = mode.default_threads()
        resources.configure_threads(
            config.intra_op_threads or intra,
            config.inter_op_threads or inter,
            spinning=config.thread_spinning,
        )
        if cluster is not None and cluster.task_type == "evaluator" and mode.takes_evaluator:
            from tftrain import evaluator

            _leave(evaluator.run(config, cluster))
        if cluster is not None and mode.serves(cluster):
            _leave(mode.serve())  # TensorFlow's server threads never end on their own
        watchdog = mode.watchdog()
        mode.setup()
        # TensorFlow's coordination service installs a SIGTERM handler of its
        # own when a multi-worker strategy starts; tftrain's comes back on top.
        stop.install()
        controller.run(config, mode, watchdog=watchdog, stop=stop)
        watchdog.stop()
    except Stopped as e:
        watchdog.stop()
        # The checkpoint is written; TensorFlow's multi-worker shutdown can
        # wait on tasks that already left, so leave without it.
        _leave(e.exit_code)
    except (ConfigError, DataError) as e:
        _fail(str(e))
    except RunError as e:
        # The run ends on this one line: no warnings at exit from a
        # half-restored checkpoint about each value it did not restore.
        import logging

        logging.getLogger("tensorflow").setLevel(logging.ERROR)
        _fail(str(e), code=e.exit_code)
    except OSError as e:  # the file system refused: unwritable model_dir, disk full
        where = f" ({e.filename})" if e.filename else ""
        _fail(f"{e.strerror or e}{where}: check --model_dir={config.model_dir}.")
    except tf.errors.OpError as e:
        said = mode.explain(e) or _explain_resources(e, config)
        if said:
            _fail(said, code=1)
        if not isinstance(
            e,
            (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError),
        ):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _fail(
            f"lost contact with another task of the cluster ({type(e).__name__}: "
            f"{first[:300]}): a worker died or never started.",
            code=1,
        )


def _explain_resources(error, config) -> str | None:
    """A full disk or an exhausted memory, said in one line; else None."""
    import tensorflow as tf

    if not isinstance(error, tf.errors.ResourceExhaustedError):
        return None
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    if "no space left" in str(error).lower():
        try:
            latest = tf.train.latest_checkpoint(os.path.join(config.model_dir, "checkpoints"))
        except (tf.errors.OpError, OSError):
            latest = None
        then = (
            f"resume from the last checkpoint ({os.path.basename(latest)}), which is kept"
            if latest
            else "start again (no checkpoint had been saved yet)"
        )
        return (
            f"the disk is full (No space left on device): free some space under "
            f"--model_dir={config.model_dir}, then run the same command to {then}."
        )
    return f"out of memory ({first}): try a smaller model or --batch_size."


def _show_defaults(flag_values, argv: list[str]) -> str:
    """Makes each training flag's help show its effective default: the
    experiment's (``--experiment`` in ``argv``) or the built-in one. Returns
    a line saying which."""
    from tftrain import registry
    from tftrain.config import ExperimentConfig

    named = next((a.split("=", 1)[1] for a in argv if a.startswith("--experiment=")), None)
    try:
        config = registry.get(named) if named else ExperimentConfig()
    except Exception as e:  # noqa: BLE001 - an unknown name: say so, show the built-ins
        config, named = ExperimentConfig(), None
        print(f"({e})")
    for field in dataclasses.fields(ExperimentConfig):
        value = getattr(config, field.name)
        if value is None or field.name == "experiment":
            continue
        if isinstance(value, tuple):
            value = [str(v) for v in value] or None
        if value is not None:
            flag_values.set_default(field.name, value)
    return (
        f"Defaults shown are those of --experiment={named}."
        if named
        else "Defaults shown are the built-in ones; with --experiment=NAME, that experiment's."
    )


def _run_absl(main, define, command: str, argv: list[str]) -> None:
    from absl import app, flags

    known = set(flags.FLAGS)
    define(flags.FLAGS)
    # --helpshort lists the main module's key flags: make the command's flags so.
    for name in sorted(set(flags.FLAGS) - known):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
    own = argv[: argv.index("--")] if "--" in argv else argv
    asked = next((a for a in own if a.lstrip("-") in ("h", "help", "helpshort", "helpfull")), None)
    if asked:
        tail = " [-- <train flags>]" if command == "launch" else ""
        print(f"usage: tftrain {command} [flags]{tail}\n")
        if command == "train":
            print(_show_defaults(flags.FLAGS, own) + "\n")
        if asked.lstrip("-") == "helpfull":
            print(flags.FLAGS.get_help())
        else:
            text = flags.FLAGS.module_help(sys.argv[0])
            print(text.replace(f"{sys.argv[0]}:", f"tftrain {command} flags:", 1).strip("\n"))
            print("\n(--helpfull also lists absl's own flags, such as --verbosity.)")
        sys.exit(0)
    try:
        flags.FLAGS([f"tftrain {command}", *argv])
    except flags.Error as e:
        _fail(f"{e} (tftrain {command} --help lists the flags).")
    try:
        app.run(main, argv=[f"tftrain {command}", *argv])
    except KeyboardInterrupt:
        sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``tftrain`` console command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("tftrain: error: expected a command: train or launch.\n", file=sys.stderr)
        print(USAGE, end="", file=sys.stderr)
        sys.exit(2)
    if argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        sys.exit(0)
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
