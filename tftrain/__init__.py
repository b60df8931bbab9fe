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

from tftrain.config import ExperimentConfig
from tftrain.errors import ConfigError, DataError, DivergedError, RunError, UserCodeError
from tftrain.tasks import Task

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
    "optimizers",
    "train",
]


def train(config, **overrides) -> dict:
    """Trains one run as ``tftrain train`` does; see :func:`tftrain.api.train`."""
    from tftrain import api

    return api.train(config, **overrides)


def __getattr__(name: str):
    if name in ("data", "optimizers"):
        import importlib

        return importlib.import_module(f"tftrain.{name}")
    raise AttributeError(f"module 'tftrain' has no attribute {name!r}")
