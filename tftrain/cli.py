"""The command line: ``tftrain train`` and ``tftrain launch``.

Flags are defined inside ``define_*_flags`` functions, never at import, so
tests import everything without registering a flag. Every config field is a
flag of the same name; an experiment sets the defaults and any flag given on
the command line overrides them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys

from tftrain.errors import first_line
from tftrain.flagset import (  # the training flags, shared with tftrain launch
    _help,  # noqa: F401 - re-exported for the tests
    _is_flag,
    config_from_flags,
    define_option_flags,
    define_train_flags,
)
from tftrain.flagset import experiment_in as _experiment_in
from tftrain.flagset import fail as _fail
from tftrain.flagset import user_code_failed as _user_code_failed

USAGE = """usage: tftrain <command> [flags]

commands:
  train    train, evaluate and export a model (tftrain train --helpshort)
  launch   run a local cluster, one process per task (tftrain launch --helpshort)
  plan     predict (and with --measure, time) every parallel mode for a run
           (tftrain plan --helpshort)
"""


def _leave(code: int) -> None:
    """Exits now with ``code``, without waiting for TensorFlow's threads."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # the console is gone; the code still holds
            pass
    os._exit(code)


_QUIETED: list = []


def _quiet_tensorflow(verbose: bool = False) -> None:
    # TensorFlow's C++ start-up lines are noise to a person watching a run.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not verbose and not _QUIETED:  # once: one filter of file descriptor 2
        _QUIETED.append(True)
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

    from tftrain import api, lifeline
    from tftrain.errors import EXIT_RETRY, RunError
    from tftrain.stopping import Stopped, StopRequest

    stop = StopRequest().install()  # again once the strategy exists (api.execute)
    box = []
    try:
        result = api.execute(
            config,
            cluster,
            mode,
            log=lifeline.say,
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
        import errno

        where = f" ({e.filename})" if e.filename else ""
        if e.errno == errno.ENOSPC:
            _fail(_disk_full(config, where), code=1)
        _fail(f"{e.strerror or e}{where}: check --model_dir={config.model_dir}.")
    except tf.errors.OpError as e:
        _stop_watchdogs(box)
        lost = mode.explain(e)
        if lost:
            _fail(lost, code=EXIT_RETRY)
        said = _explain_resources(e, config) or _explain_labels(e)
        if said:
            _fail(said, code=1)
        said = _explain_bucket(e, config)
        if said:
            _fail(*said)
        if not isinstance(
            e,
            (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError),
        ):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        lost = _tasks_named_in(str(e), cluster)
        _fail(
            f"lost contact with {lost or 'another task of the cluster'} "
            f"({type(e).__name__}: {first[:300]}): a worker died or never started.",
            code=EXIT_RETRY,
        )


def _explain_bucket(error, config) -> tuple[str, int] | None:
    """One line for a failure of the bucket ``--model_dir`` is in, and its
    exit code: 1 for a refusal (no permission, no bucket), EXIT_RETRY for the
    rest (a network blip: started again, the run resumes)."""
    import tensorflow as tf

    from tftrain import fileio
    from tftrain.errors import EXIT_RETRY

    if not fileio.is_url(config.model_dir):
        return None
    bucket = config.model_dir.split("://", 1)[1].split("/", 1)[0]
    if f"://{bucket}" not in str(error):
        return None
    first = first_line(error)[:300]
    final = isinstance(error, (tf.errors.PermissionDeniedError, tf.errors.NotFoundError))
    return (
        f"the bucket of --model_dir={config.model_dir} failed ({type(error).__name__}: "
        f"{first}); the checkpoints saved are kept, and the same command resumes.",
        1 if final else EXIT_RETRY,
    )


def _tasks_named_in(message: str, cluster) -> str | None:
    """The tasks of ``cluster`` whose addresses ``message`` names ("worker:1
    at 127.0.0.1:5001"), or None."""
    if cluster is None:
        return None
    named = []
    for task_type, addresses in cluster.cluster.items():
        for index, address in enumerate(addresses):
            if (task_type, index) == (cluster.task_type, cluster.task_index):
                continue  # its own address, where TensorFlow names it too
            if re.search(rf"(?<![\d.]){re.escape(address)}(?!\d)", message):
                named.append(f"{task_type}:{index} at {address}")
    return ", ".join(named) or _tasks_not_listening(cluster)


def _tasks_not_listening(cluster, timeout: float = 1.0) -> str | None:
    """The other tasks of ``cluster`` whose port refuses a connection now
    (their server is gone): TensorFlow's error often names no address
    ("Connection reset by peer"). At most a second a task."""
    import socket

    gone = []
    for task_type, addresses in cluster.cluster.items():
        for index, address in enumerate(addresses):
            if (task_type, index) == (cluster.task_type, cluster.task_index):
                continue
            host, _, port = address.rpartition(":")
            try:
                socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
            except ConnectionRefusedError:
                gone.append(f"{task_type}:{index} at {address} (nothing listens there now)")
            except (OSError, ValueError):
                pass  # unreachable or slow: not known to be gone
    return ", ".join(gone) or None


def _stop_watchdogs(box) -> None:
    for watchdog in box:
        watchdog.stop()


# The experiment, loaded once before the flags are parsed (its options become flags).
_LOADED: dict = {}


def _explain_labels(error) -> str | None:
    """A label outside the model's classes met in the middle of a run (the
    first batch is checked before anything starts), in one line; else None."""
    import re

    found = re.search(
        r"Received a label value of (-?\d+) which is outside the valid range of \[0, (\d+)\)",
        str(error),
    )
    if not found:
        return None
    bad, classes = int(found[1]), int(found[2])
    return (
        f"a label in the data is {bad}, but the model outputs {classes} classes: expected "
        f"labels 0-{classes - 1}. Only the first batch is checked before training: check "
        "every split's labels (or the model's number of classes)."
    )


def _disk_full(config, where: str = "") -> str:
    return (
        f"the disk is full (No space left on device{where}): free some space under "
        f"--model_dir={config.model_dir}, then run the same command to {_then_resume(config)}."
    )


def _then_resume(config) -> str:
    import tensorflow as tf

    try:
        latest = tf.train.latest_checkpoint(os.path.join(config.model_dir, "checkpoints"))
    except (tf.errors.OpError, OSError):
        latest = None
    return (
        f"resume from the last checkpoint ({os.path.basename(latest)}), which is kept"
        if latest
        else "start again (no checkpoint had been saved yet)"
    )


def _explain_resources(error, config) -> str | None:
    """A full disk, an exhausted memory or a run folder that stopped being
    writable, said in one line; else None."""
    import tensorflow as tf

    first = first_line(error)
    # TensorFlow's wrapping: "{{function_node ...}} what [Op:SaveV2]".
    first = re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\]", "", first)[:200]
    if isinstance(error, tf.errors.PermissionDeniedError):
        return (
            f"permission denied writing in --model_dir={config.model_dir} ({first}): make "
            f"it writable again, then run the same command to {_then_resume(config)}."
        )
    if not isinstance(error, tf.errors.ResourceExhaustedError):
        return None
    if "no space left" in str(error).lower():
        return _disk_full(config)
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
        # An experiment file imports TensorFlow as it loads: quiet it first.
        own = argv[: argv.index("--")] if "--" in argv else argv
        if not any(a.startswith(("--verbosity", "-v")) for a in own):
            _quiet_tensorflow()
        _load_experiment(argv, flags.FLAGS)
    # --helpshort lists the main module's key flags: make the command's flags so.
    for name in sorted(set(flags.FLAGS) - known):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
    own = argv[: argv.index("--")] if "--" in argv else argv
    asked = next((a for a in own if a.lstrip("-") in ("h", "help", "helpshort", "helpfull")), None)
    if asked:
        tail = " [-- <train flags>]" if command in ("launch", "plan") else ""
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
        # absl words a bad boolean as a tuple: "('Non-boolean argument ...', 'x')".
        said = re.sub(
            r"\('Non-boolean argument to boolean flag', '(.*)'\)$",
            r"expected true or false, not '\1'",
            str(e),
        )
        _fail(f"{said} (tftrain {command} --help lists the flags).")
    flags.FLAGS.unparse_flags()  # app.run parses again: repeated flags would double
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
        print("tftrain: error: expected a command: train, launch or plan.\n", file=sys.stderr)
        print(USAGE, end="", file=sys.stderr)
        sys.exit(2)
    if argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        sys.exit(0)
    command, rest = argv[0], argv[1:]
    if command == "train":
        from tftrain import lifeline, resources

        lifeline.follow_launcher()  # before anything that can take long

        resources.prepare_memory()  # before TensorFlow allocates anything
        _run_absl(_train_main, define_train_flags, "train", rest)
    elif command == "launch":
        from tftrain.distribute import launch

        _run_absl(launch.main, launch.define_flags, "launch", rest)
    elif command == "plan":
        from tftrain import plan

        _run_absl(plan.main, plan.define_flags, "plan", rest)
    else:
        print(
            f"tftrain: error: unknown command {command!r}: expected train, launch or plan.\n",
            file=sys.stderr,
        )
        print(USAGE, end="", file=sys.stderr)
        sys.exit(2)
