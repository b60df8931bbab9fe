"""Experiments: Python files or modules with ``get_config(variant)``.

``--experiment`` takes:

- ``NAME[:VARIANT]``: a file of tftrain's ``experiments/`` folder (an
  installed tftrain carries them as ``tftrain/_experiments``);
- ``path/to/file.py[:VARIANT]``: any file;
- ``package.module[:VARIANT]``: any importable module (the working folder is
  on the path, as with ``python -m``).

The variant (``smoke``, or any word the experiment knows) is handed to
``get_config``. The config records where the experiment came from.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from tftrain.config import ConfigError, ExperimentConfig

_HERE = os.path.dirname(os.path.abspath(__file__))
SEARCH_PATH = (
    os.path.join(_HERE, "_experiments"),  # an installed package
    os.path.join(os.path.dirname(_HERE), "experiments"),  # a source checkout
)


def _folder() -> str | None:
    for folder in SEARCH_PATH:
        if os.path.isdir(folder):
            return folder
    return None


def names() -> list[str]:
    folder = _folder()
    if folder is None:
        return []
    return sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_"))


def split_spec(spec: str) -> tuple[str, str]:
    """``(where, variant)`` of ``WHERE[:VARIANT]``."""
    where, sep, variant = spec.rpartition(":")
    if not sep or "/" in variant or variant.endswith(".py"):
        return spec, ""
    return where, variant


def is_file_spec(where: str) -> bool:
    return where.endswith(".py") or os.sep in where


def absolute(spec: str) -> str:
    """``spec`` with a file's path made absolute (for tasks started elsewhere)."""
    where, variant = split_spec(spec)
    if not is_file_spec(where) or where in names():
        return spec
    return os.path.abspath(where) + (f":{variant}" if variant else "")


def _load_file(path: str, spec: str):
    if not os.path.isfile(path):
        raise ConfigError(
            f"--experiment={spec}: no such file {path}"
            + (" (it is a folder)" if os.path.isdir(path) else "")
            + "."
        )
    folder = os.path.dirname(path)
    if folder not in sys.path:  # so that it can import the files beside it
        sys.path.insert(0, folder)
    stem = os.path.splitext(os.path.basename(path))[0]
    from tftrain.tasks import FILE_MODULE_PREFIX

    name = f"{FILE_MODULE_PREFIX}{stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None:
        raise ConfigError(f"--experiment={spec}: {path} is not a Python file.")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # classes defined in it can be found by name
    _run_user(f"importing {path}", module_spec.loader.exec_module, module)
    return module


def _load_module(name: str, spec: str):
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        found = None
    if found is None:
        known = names()
        raise ConfigError(
            f"--experiment={spec}: no experiment {name!r}: expected one of "
            f"{', '.join(known) or '(none installed)'}, a file (path/to/file.py) or an "
            "importable module (package.module)."
        )
    return _run_user(f"importing {name}", importlib.import_module, name)


def _run_user(what: str, fn, *args):
    from tftrain.tasks import call_user

    return call_user(what, fn, *args)


def get(spec: str) -> ExperimentConfig:
    """The config of an experiment (see the module's doc).

    Raises:
      ConfigError: for a missing file or module, a module without
        ``get_config`` or a ``get_config`` that returns no ExperimentConfig.
      UserCodeError: the experiment's own code raised.
    """
    where, variant = split_spec(spec)
    builtin = where in names()
    if builtin:
        if variant not in ("", "smoke"):
            raise ConfigError(
                f"--experiment={spec}: unknown variant {variant!r}; expected {where} or "
                f"{where}:smoke."
            )
        module = _load_file(os.path.join(_folder(), where + ".py"), spec)
        source = f"tftrain:experiments/{where}.py"
    elif is_file_spec(where):
        path = os.path.abspath(where)
        module = _load_file(path, spec)
        source = path
    else:
        module = _load_module(where, spec)
        source = f"{where} ({getattr(module, '__file__', '?')})"
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(
            f"--experiment={spec}: {source} has no get_config(variant) function: expected "
            "def get_config(variant=None): return tftrain.ExperimentConfig(...)."
        )
    config = _run_user(f"get_config({variant or None!r}) of {source}", get_config, variant or None)
    if not isinstance(config, ExperimentConfig):
        raise ConfigError(
            f"--experiment={spec}: get_config returned {type(config).__name__}: expected "
            "a tftrain.ExperimentConfig."
        )
    return config.replace(experiment=spec, experiment_source=source)
