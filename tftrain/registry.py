"""Named experiments: one small Python file each, with ``get_config(variant)``.

They live in the repository's ``experiments/`` folder; an installed tftrain
carries them as ``tftrain/_experiments``. ``--experiment=NAME:smoke`` picks
a file's ``smoke`` variant.
"""

from __future__ import annotations

import importlib.util
import os

from tftrain.config import ConfigError, ExperimentConfig

_HERE = os.path.dirname(os.path.abspath(__file__))
SEARCH_PATH = (
    os.path.join(_HERE, "_experiments"),  # an installed package
    os.path.join(os.path.dirname(_HERE), "experiments"),  # a source checkout
)


def _folder() -> str:
    for folder in SEARCH_PATH:
        if os.path.isdir(folder):
            return folder
    raise ConfigError(f"no experiments folder found (looked in {', '.join(SEARCH_PATH)}).")


def names() -> list[str]:
    folder = _folder()
    return sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_"))


def get(spec: str) -> ExperimentConfig:
    """The config of ``NAME`` or ``NAME:VARIANT``.

    Raises:
      ConfigError: for an unknown name or variant.
    """
    name, _, variant = spec.partition(":")
    known = names()
    if name not in known:
        raise ConfigError(
            f"--experiment={spec}: no experiment {name!r}; expected one of {', '.join(known)}."
        )
    path = os.path.join(_folder(), name + ".py")
    module_spec = importlib.util.spec_from_file_location(f"tftrain_experiment_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if variant not in ("", "smoke"):
        raise ConfigError(
            f"--experiment={spec}: unknown variant {variant!r}; expected {name} or {name}:smoke."
        )
    return module.get_config(variant or None)
