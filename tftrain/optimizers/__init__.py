"""tftrain's own optimizers: Keras 3 optimizer subclasses with fused updates.

``get(name, **kwargs)`` builds one by its ``--optimizer`` name.
"""

from __future__ import annotations

from tftrain.optimizers.adagrad import Adagrad
from tftrain.optimizers.adam import Adam
from tftrain.optimizers.schedules import WarmupDecay, scaled_learning_rate
from tftrain.optimizers.sgd import SGD

NAMES = ("sgd", "momentum", "adagrad", "adam")


def get(name: str, **kwargs):
    """Builds an optimizer by name.

    Args:
      name: ``sgd``, ``momentum`` (SGD with momentum 0.9 unless ``momentum``
        is given), ``adagrad`` or ``adam``.
      **kwargs: the class's constructor arguments.

    Raises:
      ValueError: for an unknown name.
    """
    if name == "sgd":
        return SGD(**kwargs)
    if name == "momentum":
        kwargs.setdefault("momentum", 0.9)
        return SGD(**kwargs)
    if name == "adagrad":
        return Adagrad(**kwargs)
    if name == "adam":
        return Adam(**kwargs)
    raise ValueError(f"optimizer={name!r}: expected one of {', '.join(NAMES)}.")


__all__ = ["SGD", "Adagrad", "Adam", "WarmupDecay", "get", "scaled_learning_rate", "NAMES"]
