"""What tftrain's optimizers share on top of ``keras.optimizers.Optimizer``."""

from __future__ import annotations

import types

import keras
import tensorflow as tf


def _atomic_assign_add(self, value):
    # Keras's Variable.assign_add is ``assign(self + value)``: a read, then a
    # write. Under asynchronous parameter-server training two workers can
    # read the same count and both write count + 1, losing a step. The
    # resource op underneath (AssignAddVariableOp) adds in place.
    variable = self.value
    context = tf.distribute.get_replica_context()
    if isinstance(value, int) and context is not None and context.num_replicas_in_sync > 1:
        # Every replica counts the same step. In replica context an update of
        # this ONLY_FIRST_REPLICA variable broadcasts replica 0's value to every
        # worker: a collective per step. Adding the constant to each local copy
        # from cross-replica context needs no communication.
        return context.merge_call(lambda _: variable.assign_add(value))
    return variable.assign_add(tf.cast(value, variable.dtype))


class Optimizer(keras.optimizers.Optimizer):
    """Base class: an iteration counter that concurrent updates cannot lose."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._iterations.assign_add = types.MethodType(_atomic_assign_add, self._iterations)
        # Set by the trainer when tftrain's TCP ring, not the strategy, sums
        # the gradients across workers (tftrain.distribute.ring).
        self.gradient_reducer = None

    def _all_reduce_sum_gradients(self, grads_and_vars):
        if self.gradient_reducer is None or tf.distribute.get_replica_context() is None:
            return super()._all_reduce_sum_gradients(grads_and_vars)
        from tftrain.distribute.ring import all_reduce_in_graph

        pairs = [(g, v) for g, v in grads_and_vars if g is not None]
        summed = all_reduce_in_graph(self.gradient_reducer, [g for g, _ in pairs])
        return list(zip(summed, (v for _, v in pairs)))

    def _slot(self, slots, variable):
        """The tf.Variable behind the slot of ``variable`` (per device in an update)."""
        return slots[self._get_variable_index(variable)].value

    def _step_powers(self, dtype, *betas):
        """``beta ** t`` for each beta, with t the 1-based number of this step."""
        t = tf.cast(self.iterations + 1, dtype)
        return [tf.pow(tf.cast(b, dtype), t) for b in betas]


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
