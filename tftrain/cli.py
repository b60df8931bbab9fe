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


def _experiment_in(argv: list[str]) -> str | None:
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


def load_run(flag_values, loaded=None):
    """The config, the cluster and the parallel mode, all checked: every
    validation happens here, before anything starts.

    Raises:
      ConfigError: for the first thing that is wrong.
    """
    from tftrain import api

    return api.prepare(config_from_flags(flag_values, loaded))


def _train_main(argv):
    from absl import flags

    from tftrain.config import ConfigError
    from tftrain.errors import DataError, UserCodeError

    if len(argv) > 1:
        _fail(
            f"unexpected argument {argv[1]!r}: train takes flags only "
            "(see tftrain train --helpshort)."
        )
    flag_values = flags.FLAGS
    try:
        config, cluster, mode = load_run(flag_values, _LOADED.get("config"))
    except UserCodeError as e:
        _user_code_failed(e)
    except (ConfigError, DataError) as e:
        _fail(str(e))
    _quiet_tensorflow(verbose=flag_values["verbosity"].present)
    if not flag_values["verbosity"].present:
        from absl import logging

        logging.set_verbosity(logging.WARNING)
    import tensorflow as tf

    from tftrain import api
    from tftrain.errors import RunError
    from tftrain.stopping import Stopped, StopRequest

    stop = StopRequest().install()  # again once the strategy exists (api.execute)
    box = []
    try:
        result = api.execute(
            config,
            cluster,
            mode,
            log=lambda line: print(line, flush=True),
            stop=stop,
            watchdog_box=box,
        )
        if isinstance(result, int):  # a serving or evaluating role
            _leave(result)  # TensorFlow's server threads never end on their own
    except Stopped as e:
        _stop_watchdogs(box)
        # The checkpoint is written; TensorFlow's multi-worker shutdown can
        # wait on tasks that already left, so leave without it.
        _leave(e.exit_code)
    except UserCodeError as e:
        _stop_watchdogs(box)
        _user_code_failed(e)
    except (ConfigError, DataError) as e:
        _stop_watchdogs(box)
        _fail(str(e))
    except RunError as e:
        _stop_watchdogs(box)
        # The run ends on this one line: no warnings at exit from a
        # half-restored checkpoint about each value it did not restore.
        import logging

        logging.getLogger("tensorflow").setLevel(logging.ERROR)
        _fail(str(e), code=e.exit_code)
    except OSError as e:  # the file system refused: unwritable model_dir, disk full
        _stop_watchdogs(box)
        where = f" ({e.filename})" if e.filename else ""
        _fail(f"{e.strerror or e}{where}: check --model_dir={config.model_dir}.")
    except tf.errors.OpError as e:
        _stop_watchdogs(box)
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


def _stop_watchdogs(box) -> None:
    for watchdog in box:
        watchdog.stop()


def _user_code_failed(error) -> None:
    """The user's traceback (their bug to read), then tftrain's one line."""
    import traceback

    cause = error.error
    here = os.path.dirname(os.path.abspath(__file__))
    tb = cause.__traceback__
    # From the first frame of theirs: tftrain's own frames above it are not their concern.
    while (
        tb is not None
        and tb.tb_next is not None
        and tb.tb_frame.f_code.co_filename.startswith(here)
    ):
        tb = tb.tb_next
    traceback.print_exception(type(cause), cause, tb, file=sys.stderr)
    _fail(str(error))


# The experiment, loaded once before the flags are parsed (its options become flags).
_LOADED: dict = {}


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

    named = _experiment_in(argv)
    config = _LOADED.get("config") or ExperimentConfig()
    if named and "config" not in _LOADED:
        try:
            config = registry.get(named)
        except Exception as e:  # noqa: BLE001 - an unknown name: say so, show the built-ins
            config, named = ExperimentConfig(), None
            print(f"({e})")
    for field in dataclasses.fields(ExperimentConfig):
        value = getattr(config, field.name)
        if value is None or field.name == "experiment" or not _is_flag(field):
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
    if command == "train":
        _load_experiment(argv, flags.FLAGS)
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


def _load_experiment(argv: list[str], flag_values) -> None:
    """Loads ``--experiment`` before the flags are parsed, so that its own
    options are flags too; a bad experiment ends here, in one line."""
    from tftrain import registry
    from tftrain.config import ConfigError
    from tftrain.errors import UserCodeError

    _LOADED.clear()
    named = _experiment_in(argv)
    if not named:
        return
    try:
        config = registry.get(named)
        define_option_flags(config, flag_values)
    except UserCodeError as e:
        _user_code_failed(e)
    except ConfigError as e:
        _fail(str(e))
    _LOADED["config"] = config


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
