"""The training flags: one per ExperimentConfig field (its help beside the
field), one per option of the experiment, and the
config they make. Shared by ``tftrain train`` (:mod:`tftrain.cli`) and
``tftrain launch`` (:mod:`tftrain.distribute.launch`), which checks a run's
flags as its tasks will; neither imports the other for them.
"""

from __future__ import annotations

import dataclasses
import os
import sys


def _help() -> dict[str, str]:
    """Each training flag's help, from its field (the choices as registered now)."""
    from tftrain.config import ExperimentConfig, field_help

    return {f.name: field_help(f) for f in dataclasses.fields(ExperimentConfig) if _is_flag(f)}


def _is_flag(field) -> bool:
    return field.metadata.get("flag", True)


def _define(name: str, kind: str, help_text: str, flag_values, default=None) -> None:
    """``kind``: config.field_kind's or config.value_kind's word."""
    from absl import flags

    define = {
        "tuple": flags.DEFINE_list,
        "bool": flags.DEFINE_bool,
        "int": flags.DEFINE_integer,
        "float": flags.DEFINE_float,
    }.get(kind, flags.DEFINE_string)
    define(name, default, help_text, flag_values=flag_values)


def define_train_flags(flag_values) -> None:
    """Defines one flag per ExperimentConfig field, on ``flag_values``, with
    the help written beside the field."""
    from tftrain.config import ExperimentConfig, field_help, field_kind

    for field in dataclasses.fields(ExperimentConfig):
        if _is_flag(field):
            _define(field.name, field_kind(str(field.type)), field_help(field), flag_values)


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
    from tftrain.config import ConfigError, value_kind

    for name, default in config.options.items():
        if name in flag_values:
            raise ConfigError(
                f"the experiment's option {name!r} has the name of one of tftrain's own "
                "flags: rename the option."
            )
        kind = value_kind(default)
        value = [str(v) for v in default] if kind == "tuple" else default
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
            element = kind[len("tuple[") :].split(",")[0].strip()
            cast = {"int": int, "float": float}.get(element, str)
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
