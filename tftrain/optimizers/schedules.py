"""Learning-rate schedules: linear warm-up, then constant, cosine or step decay.

The linear scaling rule (Goyal et al. 2017, "Accurate, Large Minibatch
SGD"): when the global batch grows by k, multiply the learning rate by k,
and warm it up linearly over the first epochs so the early, large updates
do not diverge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import tensorflow as tf


def scaled_learning_rate(base_lr: float, batch_size: int, base_batch_size: int) -> float:
    """The linear scaling rule: ``base_lr * batch_size / base_batch_size``."""
    return base_lr * batch_size / base_batch_size


@keras.saving.register_keras_serializable(package="tftrain")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then a decay.

    Args:
      peak: the learning rate reached at the end of warm-up.
      warmup_steps: steps of linear warm-up (0: none). The rate at step s
        (0-based) during warm-up is ``peak * (s + 1) / warmup_steps``, so the
        very first update is not zero.
      decay: ``constant``, ``cosine`` (to 0 at ``total_steps``) or ``step``
        (times ``decay_rate`` at each of ``boundaries``).
      total_steps: the run's length, for cosine.
      boundaries: steps where the step schedule decays.
      decay_rate: the step schedule's factor.
    """

    def __init__(
        self,
        peak: float,
        *,
        warmup_steps: int = 0,
        decay: str = "constant",
        total_steps: int = 1,
        boundaries: Sequence[int] = (),
        decay_rate: float = 0.1,
    ):
        if decay not in ("constant", "cosine", "step"):
            raise ValueError(f"decay={decay!r}: expected constant, cosine or step.")
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.decay = decay
        self.total_steps = max(int(total_steps), 1)
        self.boundaries = [int(b) for b in boundaries]
        self.decay_rate = float(decay_rate)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        peak = tf.constant(self.peak, tf.float32)
        if self.decay == "cosine":
            span = max(self.total_steps - self.warmup_steps, 1)
            progress = tf.clip_by_value((step - self.warmup_steps) / span, 0.0, 1.0)
            rate = peak * 0.5 * (1.0 + tf.cos(math.pi * progress))
        elif self.decay == "step":
            crossed = tf.add_n(
                [tf.cast(step >= b, tf.float32) for b in self.boundaries] or [tf.zeros([])]
            )
            rate = peak * tf.pow(self.decay_rate, crossed)
        else:
            rate = peak
        if self.warmup_steps > 0:
            warm = peak * (step + 1.0) / self.warmup_steps
            rate = tf.where(step < self.warmup_steps, warm, rate)
        return rate

    def get_config(self):
        return {
            "peak": self.peak,
            "warmup_steps": self.warmup_steps,
            "decay": self.decay,
            "total_steps": self.total_steps,
            "boundaries": self.boundaries,
            "decay_rate": self.decay_rate,
        }
