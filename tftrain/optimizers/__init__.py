"""tftrain's own optimizers: Keras 3 optimizer subclasses with fused updates.

``get(name, **kwargs)`` builds one by its ``--optimizer`` name (the names
live in :data:`tftrain.plugins.OPTIMIZERS`); ``from_config`` builds the one a
run's config asks for, with its learning-rate schedule.
"""

from __future__ import annotations

from tftrain import plugins
from tftrain.optimizers.adagrad import Adagrad
from tftrain.optimizers.adam import Adam
from tftrain.optimizers.schedules import WarmupDecay, scaled_learning_rate
from tftrain.optimizers.sgd import SGD

NAMES = plugins.OPTIMIZERS.names()


def get(name: str, **kwargs):
    """Builds an optimizer by name.

    Args:
      name: ``sgd``, ``momentum`` (SGD with momentum 0.9 unless ``momentum``
        is given), ``adagrad``, ``adam``, or any name registered in
        ``tftrain.plugins.OPTIMIZERS``.
      **kwargs: the class's constructor arguments.

    Raises:
      ValueError: for an unknown name.
    """
    if name not in plugins.OPTIMIZERS:
        raise ValueError(f"optimizer={name!r}: expected one of {', '.join(NAMES)}.")
    return plugins.OPTIMIZERS.get(name)(**kwargs)


def from_config(config, steps_per_epoch: int, total_steps: int):
    """The optimizer ``config`` asks for, with its learning-rate schedule."""
    peak = config.learning_rate
    if config.scale_lr_with_batch:
        peak = scaled_learning_rate(peak, config.batch_size, config.base_batch_size)
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if config.lr_schedule == "constant" and warmup == 0:
        learning_rate = peak
    else:
        learning_rate = WarmupDecay(
            peak,
            warmup_steps=warmup,
            decay=config.lr_schedule,
            total_steps=total_steps,
            boundaries=[int(round(e * steps_per_epoch)) for e in config.lr_decay_epochs],
            decay_rate=config.lr_decay_rate,
        )
    kwargs = {"learning_rate": learning_rate}
    if config.momentum is not None:  # validated: sgd or momentum only
        kwargs["momentum"] = config.momentum
    if config.nesterov:  # validated: sgd or momentum only
        kwargs["nesterov"] = True
    if config.weight_decay:
        kwargs["weight_decay"] = config.weight_decay
    if config.clip_norm:
        kwargs["global_clipnorm"] = config.clip_norm
    return get(config.optimizer, **kwargs)


def exclude_from_decay(optimizer, variables, patterns=()) -> list:
    """Leaves out of the optimizer's weight decay every variable of rank 0
    or 1 (biases, normalization layers' scales and offsets), every bias
    (a variable named ``bias``: attention's are of rank 2) and every
    variable whose path (``layer/name``) matches one of ``patterns``
    (regular expressions, e.g. ``embeddings``); returns those left out.
    Call it before the optimizer is built."""
    import re

    left_out = [
        v
        for v in variables
        if len(v.shape) <= 1
        or v.path.rsplit("/", 1)[-1] == "bias"  # biases of any rank (attention's are 2-D)
        or any(re.search(p, v.path) for p in patterns)
    ]
    optimizer.exclude_from_weight_decay(var_list=left_out)
    return left_out


__all__ = [
    "SGD",
    "Adagrad",
    "Adam",
    "WarmupDecay",
    "get",
    "exclude_from_decay",
    "from_config",
    "scaled_learning_rate",
    "NAMES",
]
