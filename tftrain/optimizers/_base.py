"""What tftrain's optimizers share on top of ``keras.optimizers.Optimizer``."""

from __future__ import annotations

import functools

import keras
import tensorflow as tf

from tftrain import _internal


class Optimizer(keras.optimizers.Optimizer):
    """Base class: an iteration counter that concurrent updates cannot lose,
    a place for another way of summing gradients across workers, a look at
    the summed gradients, and updates that can be skipped.

    ``gradient_observer(grads_and_vars)``, when set, sees the gradients once
    they are summed over every replica (the gradients of the update) and
    returns the pairs to apply. With ``skip_nonfinite``, a variable whose
    gradient holds a NaN or infinity is not updated: an observer that makes
    every gradient NaN when one is not finite (tftrain.trainer) skips the
    whole update. The iteration counter still advances, so the learning-rate
    schedule and the step stay aligned.
    """

    def __init__(self, *args, global_clipnorm=None, **kwargs):
        # Keras would clip each replica's share of the gradients by its own
        # norm, before they are summed; tftrain clips the summed gradients
        # of the update (``_sum_gradients``), so Keras never sees it.
        super().__init__(*args, **kwargs)
        if global_clipnorm is not None and (self.clipnorm or self.clipvalue):
            raise ValueError("only one of clipnorm, clipvalue and global_clipnorm can be set")
        if global_clipnorm is not None and global_clipnorm <= 0:
            raise ValueError(f"global_clipnorm={global_clipnorm}: expected a number > 0")
        self.clip_norm = global_clipnorm
        _internal.make_iteration_count_atomic(self)
        # Set by the trainer when something other than the strategy sums the
        # gradients across workers (tftrain.distribute.ring.RingAllReduce).
        self.gradient_reducer = None
        self.gradient_observer = None
        self.skip_nonfinite = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "update_step" in cls.__dict__:
            cls.update_step = _skippable(cls.__dict__["update_step"])

    def get_config(self):
        config = super().get_config()
        config["global_clipnorm"] = self.clip_norm
        return config

    def _slot(self, slots, variable):
        """The tf.Variable behind the slot of ``variable`` (per device in an update)."""
        return slots[_internal.variable_index(self, variable)].value

    def _step_powers(self, dtype, *betas):
        """``beta ** t`` for each beta, with t the 1-based number of this step."""
        t = tf.cast(self.iterations + 1, dtype)
        return [tf.pow(tf.cast(b, dtype), t) for b in betas]


def _skippable(update_step):
    """``update_step`` that leaves the variable alone, under ``skip_nonfinite``,
    when its gradient is not finite."""

    @functools.wraps(update_step)
    def method(self, gradient, variable, learning_rate):
        if not self.skip_nonfinite:
            return update_step(self, gradient, variable, learning_rate)
        values = gradient.values if isinstance(gradient, tf.IndexedSlices) else gradient
        finite = tf.reduce_all(tf.math.is_finite(values))

        def update():
            update_step(self, gradient, variable, learning_rate)

        tf.cond(finite, update, lambda: None)

    return method


def _sum_gradients(optimizer, grads_and_vars, keras_sum):
    if optimizer.gradient_reducer is not None and tf.distribute.get_replica_context() is not None:
        pairs = [(g, v) for g, v in grads_and_vars if g is not None]
        summed = optimizer.gradient_reducer.reduce_in_graph([g for g, _ in pairs])
        pairs = list(zip(summed, (v for _, v in pairs)))
    else:  # the strategy's own all-reduce
        pairs = keras_sum(grads_and_vars)
    if optimizer.gradient_observer is not None:
        pairs = optimizer.gradient_observer(list(pairs))
    if optimizer.clip_norm is not None:
        pairs = clip_by_global_norm(list(pairs), optimizer.clip_norm)
    return pairs


def clip_by_global_norm(grads_and_vars, clip_norm: float):
    """The gradients scaled by ``clip_norm / max(norm, clip_norm)``, with
    ``norm`` the global norm of the update's gradients as dense ones would
    be (a sparse gradient's rows that share an index are summed first), so
    that a sparse and a dense gradient of the same update clip alike."""
    pairs = [(g, v) for g, v in grads_and_vars if g is not None]
    parts = [deduplicate(g)[0] if isinstance(g, tf.IndexedSlices) else g for g, _ in pairs]
    norm = tf.linalg.global_norm([tf.cast(p, tf.float32) for p in parts])
    limit = tf.constant(clip_norm, tf.float32)
    scale = limit / tf.maximum(norm, limit)

    def scaled(g):
        if isinstance(g, tf.IndexedSlices):
            return tf.IndexedSlices(g.values * tf.cast(scale, g.dtype), g.indices, g.dense_shape)
        return g * tf.cast(scale, g.dtype)

    return [(scaled(g), v) for g, v in pairs]


_internal.install_gradient_sum_hook(Optimizer, _sum_gradients)


def as_tf_variable(variable):
    return variable.value if isinstance(variable, keras.Variable) else variable


def deduplicate(gradient: tf.IndexedSlices):
    """Sums the rows of a sparse gradient that share an index.

    Returns:
      ``(values, indices)`` with unique indices: the rows the dense gradient
      would hold.
    """
    indices, positions = tf.unique(gradient.indices)
    values = tf.math.unsorted_segment_sum(gradient.values, positions, tf.shape(indices)[0])
    return values, indices


# Dtypes TensorFlow's fused training kernels are registered for on every device.
FUSED_DTYPES = (tf.float32, tf.float64, tf.float16, tf.bfloat16)
