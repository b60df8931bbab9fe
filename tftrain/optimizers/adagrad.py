"""Adagrad (Duchi, Hazan and Singer 2011)."""

from __future__ import annotations

import keras
import tensorflow as tf

from tftrain.optimizers._base import Optimizer, as_tf_variable, deduplicate


@keras.saving.register_keras_serializable(package="tftrain")
class Adagrad(Optimizer):
    """Adagrad: per-coordinate steps scaled by the accumulated squared gradients.

    With the accumulator ``G`` starting at ``initial_accumulator_value``::

        G <- G + g * g
        w <- w - lr * g / sqrt(G + epsilon)      (epsilon_inside_sqrt=True)
        w <- w - lr * g / (sqrt(G) + epsilon)    (epsilon_inside_sqrt=False)

    Where epsilon sits is a convention, and it matters: Keras 3 puts it inside
    the square root (the default here, so results match
    ``keras.optimizers.Adagrad``); Duchi et al.'s ``delta * I + diag(G)^(1/2)``
    and TensorFlow's fused ``ResourceApplyAdagradV2`` put it outside. With an
    empty accumulator (``initial_accumulator_value=0``) and a first gradient
    of 1e-4, the first step is about ``lr * 1e-4 / 3.2e-4`` inside but
    ``lr * 1e-4 / 1e-4`` outside: the two can differ by orders of magnitude
    when gradients are tiny.

    Both forms run as one fused kernel per variable. For the inside form the
    accumulator slot holds ``G + epsilon`` (it starts at
    ``initial_accumulator_value + epsilon``), so that
    ``lr * g / sqrt(slot)`` is TensorFlow's epsilon-free ``ResourceApplyAdagrad``
    and equals ``lr * g / sqrt(G + epsilon)``.

    Sparse gradients update only their rows; untouched rows have a zero
    gradient, which leaves both ``G`` and ``w`` as they are, so the sparse
    update equals the dense one exactly.

    Args:
      learning_rate: a float, a schedule, or a callable. Default 0.001.
      initial_accumulator_value: the accumulator's start. Default 0.1.
      epsilon: the stabiliser. Default 1e-7.
      epsilon_inside_sqrt: see above. Default True (Keras 3).
      **kwargs: the base class's ``weight_decay``, ``clipnorm`` and the rest.
    """

    def __init__(
        self,
        learning_rate=0.001,
        initial_accumulator_value=0.1,
        epsilon=1e-7,
        name="adagrad",
        epsilon_inside_sqrt=True,
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.initial_accumulator_value = initial_accumulator_value
        self.epsilon = epsilon
        self.epsilon_inside_sqrt = bool(epsilon_inside_sqrt)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        start = self.initial_accumulator_value
        if self.epsilon_inside_sqrt:
            start += self.epsilon  # the slot holds G + epsilon: see the class doc
        self._accumulators = self.add_optimizer_variables(
            var_list, "accumulator", initializer=keras.initializers.Constant(start)
        )

    def update_step(self, gradient, variable, learning_rate):
        var = as_tf_variable(variable)
        acc = self._slot(self._accumulators, variable)
        lr = tf.cast(learning_rate, var.dtype)
        eps = tf.cast(self.epsilon, var.dtype)
        inside = self.epsilon_inside_sqrt
        if isinstance(gradient, tf.IndexedSlices):
            values, indices = deduplicate(gradient)
            sparse = dict(
                var=var.handle,
                accum=acc.handle,
                lr=lr,
                grad=tf.cast(values, var.dtype),
                indices=indices,
            )
            if inside:
                tf.raw_ops.ResourceSparseApplyAdagrad(**sparse)
            else:
                tf.raw_ops.ResourceSparseApplyAdagradV2(epsilon=eps, **sparse)
            return
        dense = dict(var=var.handle, accum=acc.handle, lr=lr, grad=tf.cast(gradient, var.dtype))
        if inside:
            tf.raw_ops.ResourceApplyAdagrad(**dense)
        else:
            tf.raw_ops.ResourceApplyAdagradV2(epsilon=eps, **dense)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "initial_accumulator_value": self.initial_accumulator_value,
                "epsilon": self.epsilon,
                "epsilon_inside_sqrt": self.epsilon_inside_sqrt,
            }
        )
        return config
