"""tftrain: train Keras 3 models under tf.distribute with tftrain's own loop.

The public API::

    import tftrain

    class MyTask(tftrain.Task):
        def build_model(self, config): ...
        def build_inputs(self, config, context, training): ...

    config = tftrain.ExperimentConfig(task=MyTask, batch_size=64, train_steps=1000)
    metrics = tftrain.train(config, model_dir="runs/mine")

Importing tftrain does no TensorFlow work: no strategy, no seeds, no flags;
``tftrain.data`` (the input helpers) and ``tftrain.train`` bring TensorFlow
in when first used.
"""

import os as _os
import platform as _platform

# TensorFlow's GCS filesystem reads these once, as TensorFlow loads: a file
# another task rewrote (the checkpoint state file, config.json) must be read
# as it is now, not as a cache up to 5 s old remembers it (its length
# included: a stale one cut a read short).
for _name in ("GCS_STAT_CACHE_MAX_AGE", "GCS_READ_CACHE_MAX_SIZE_MB"):
    _os.environ.setdefault(_name, "0")

# oneDNN's CPU kernels: TensorFlow turns them on by itself only on x86 CPUs
# with AVX-512 VNNI, BF16 or AMX. On an AVX2 CPU they trained the ResNet and
# the CNN 1.9x as fast as TensorFlow's own kernels, and no case slower
# (BUILD_NOTES.md, "oneDNN on every x86 CPU"). A user's own setting wins; it
# is read once, as TensorFlow loads, so only before TensorFlow is imported.
if _platform.system() == "Linux" and _platform.machine() == "x86_64":
    _os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from tftrain.config import ExperimentConfig  # noqa: E402
from tftrain.errors import (  # noqa: E402
    ConfigError,
    DataError,
    DivergedError,
    RunError,
    UserCodeError,
)
from tftrain.tasks import Task  # noqa: E402

__version__ = "0.2.0"

__all__ = [
    "ConfigError",
    "DataError",
    "DivergedError",
    "ExperimentConfig",
    "RunError",
    "Task",
    "UserCodeError",
    "data",
    "layers",
    "optimizers",
    "train",
]


def train(config, **overrides) -> dict:
    """Trains one run as ``tftrain train`` does; see :func:`tftrain.api.train`."""
    from tftrain import api

    return api.train(config, **overrides)


def __getattr__(name: str):
    if name in ("data", "layers", "optimizers"):
        import importlib

        return importlib.import_module(f"tftrain.{name}")
    raise AttributeError(f"module 'tftrain' has no attribute {name!r}")
