"""Gradient descent, with optional momentum and Nesterov momentum."""

from __future__ import annotations

import keras
import tensorflow as tf

from tftrain.optimizers._base import FUSED_DTYPES, Optimizer, as_tf_variable, deduplicate


@keras.saving.register_keras_serializable(package="tftrain")
class SGD(Optimizer):
    """Stochastic gradient descent, as Keras defines it.

    Without momentum: ``w <- w - lr * g``.

    With momentum ``mu`` (the velocity ``v`` starts at 0), Keras's form, where
    the learning rate sits inside the velocity (Sutskever et al. 2013)::

        v <- mu * v - lr * g
        w <- w + v                      (classical momentum)
        w <- w + mu * v - lr * g        (nesterov=True)

    Dense updates run as one fused kernel per variable
    (``ResourceApplyGradientDescent`` / ``ResourceApplyKerasMomentum``).
    Sparse gradients (``tf.IndexedSlices``) touch only their rows. Without
    momentum that equals the dense update exactly; with momentum the
    untouched rows keep their velocity and weights (a dense update would
    decay those velocities and keep moving those rows), the usual "lazy"
    convention for embeddings.

    Args:
      learning_rate: a float, a schedule, or a callable. Default 0.01.
      momentum: float in [0, 1). Default 0 (plain gradient descent).
      nesterov: use Nesterov momentum. Default False.
      **kwargs: the base class's ``weight_decay``, ``clipnorm``,
        ``clipvalue``, ``global_clipnorm``, ``name`` and the rest.
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum=0.0,
        nesterov=False,
        name="SGD",
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum={momentum!r}: expected a float in [0, 1].")
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._velocities = []
        if self.momentum != 0:
            self._velocities = self.add_optimizer_variables(var_list, "momentum")

    def update_step(self, gradient, variable, learning_rate):
        var = as_tf_variable(variable)
        lr = tf.cast(learning_rate, var.dtype)
        mu = tf.cast(self.momentum, var.dtype)
        sparse = isinstance(gradient, tf.IndexedSlices)
        if self.momentum == 0:
            if sparse:
                var.scatter_sub(
                    tf.IndexedSlices(
                        tf.cast(gradient.values, var.dtype) * lr,
                        gradient.indices,
                        gradient.dense_shape,
                    )
                )
            elif var.dtype in FUSED_DTYPES:
                tf.raw_ops.ResourceApplyGradientDescent(
                    var=var.handle, alpha=lr, delta=tf.cast(gradient, var.dtype)
                )
            else:
                var.assign_sub(lr * tf.cast(gradient, var.dtype))
            return
        velocity = self._slot(self._velocities, variable)
        if sparse:
            values, indices = deduplicate(gradient)
            tf.raw_ops.ResourceSparseApplyKerasMomentum(
                var=var.handle,
                accum=velocity.handle,
                lr=lr,
                grad=tf.cast(values, var.dtype),
                indices=indices,
                momentum=mu,
                use_nesterov=self.nesterov,
            )
        else:
            tf.raw_ops.ResourceApplyKerasMomentum(
                var=var.handle,
                accum=velocity.handle,
                lr=lr,
                grad=tf.cast(gradient, var.dtype),
                momentum=mu,
                use_nesterov=self.nesterov,
            )

    def get_config(self):
        config = super().get_config()
        config.update({"momentum": self.momentum, "nesterov": self.nesterov})
        return config


def plain_sgd(**kwargs) -> SGD:
    """``--optimizer=sgd``: gradient descent, with momentum only if given."""
    return SGD(**kwargs)


def momentum_sgd(**kwargs) -> SGD:
    """``--optimizer=momentum``: SGD with momentum 0.9 unless given."""
    kwargs.setdefault("momentum", 0.9)
    return SGD(**kwargs)
