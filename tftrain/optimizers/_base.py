"""What tftrain's optimizers share on top of ``keras.optimizers.Optimizer``."""

from __future__ import annotations

import keras
import tensorflow as tf

from tftrain import _internal


class Optimizer(keras.optimizers.Optimizer):
    """Base class: an iteration counter that concurrent updates cannot lose,
    and a place for another way of summing gradients across workers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _internal.make_iteration_count_atomic(self)
        # Set by the trainer when something other than the strategy sums the
        # gradients across workers (tftrain.distribute.ring.RingAllReduce).
        self.gradient_reducer = None

    def _slot(self, slots, variable):
        """The tf.Variable behind the slot of ``variable`` (per device in an update)."""
        return slots[_internal.variable_index(self, variable)].value

    def _step_powers(self, dtype, *betas):
        """``beta ** t`` for each beta, with t the 1-based number of this step."""
        t = tf.cast(self.iterations + 1, dtype)
        return [tf.pow(tf.cast(b, dtype), t) for b in betas]


def _reduce_with_gradient_reducer(optimizer, grads_and_vars):
    if optimizer.gradient_reducer is None or tf.distribute.get_replica_context() is None:
        return None  # the strategy's own all-reduce
    pairs = [(g, v) for g, v in grads_and_vars if g is not None]
    summed = optimizer.gradient_reducer.reduce_in_graph([g for g, _ in pairs])
    return list(zip(summed, (v for _, v in pairs)))


_internal.install_gradient_sum_hook(Optimizer, _reduce_with_gradient_reducer)


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
