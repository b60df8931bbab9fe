"""Adam (Kingma and Ba 2015), with the AMSGrad variant (Reddi et al. 2018)."""

from __future__ import annotations

import keras
import tensorflow as tf

from tftrain import resources
from tftrain.optimizers._base import Optimizer, as_tf_variable, deduplicate

# TensorFlow's CPU kernel for ResourceApplyAdam hands every variable of 512
# elements or more to the intra-op thread pool in pieces, however little work
# that is: a variable of 1,024 to 16,384 elements costs 49-62 us that way, and
# 18-47 us as the same rule in plain elementwise ops (one thread, no hand-off).
# Measured on this project's 2-core machine by benchmarks.optimizer_step
# (BUILD_NOTES.md, "Adam's small variables"); AMSGrad's fused kernel does not
# split and keeps its one op.
# With a pool of one thread (a launched worker on its own core, a mirrored
# replica's share of 2 cores) nothing is split and the fused kernel wins.
_ELEMENTWISE_SIZES = range(512, 16384 + 1)


def _elementwise_on_cpu(var) -> bool:
    """Whether the dense Adam update of ``var`` runs as elementwise ops."""
    if var.shape.num_elements() not in _ELEMENTWISE_SIZES:
        return False
    threads = tf.config.threading.get_intra_op_parallelism_threads() or resources.usable_cores()
    if threads == 1:
        return False
    return tf.DeviceSpec.from_string(var.device or "").device_type != "GPU"


@keras.saving.register_keras_serializable(package="tftrain")
class Adam(Optimizer):
    """Adam in the efficient form of Kingma and Ba's section 2.

    With step ``t`` counted from 1 and ``m``, ``v`` starting at 0::

        m <- beta_1 * m + (1 - beta_1) * g          (first moment)
        v <- beta_2 * v + (1 - beta_2) * g * g      (second raw moment)
        alpha_t = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)
        w <- w - alpha_t * m / (sqrt(v) + epsilon_hat)

    ``epsilon`` is the paper's "epsilon hat" of that efficient form, not the
    epsilon of Algorithm 1 (which is added to the bias-corrected sqrt(v_hat));
    the two forms differ only by where epsilon is scaled. This is what
    ``keras.optimizers.Adam`` and TensorFlow's fused ``ResourceApplyAdam``
    compute, with the same defaults. With ``amsgrad=True`` the denominator
    uses ``v_hat = max(v_hat, v)`` (Reddi et al.).

    Dense updates run as one fused kernel per variable, except mid-sized
    variables on a CPU (see ``_elementwise_on_cpu``). Sparse gradients
    update only their rows of ``m``, ``v`` and ``w`` ("lazy" Adam): the
    touched rows equal the dense update's rows; untouched rows keep their
    moments and weights, where the dense update would decay the moments and
    keep moving those rows.

    Args:
      learning_rate: a float, a schedule, or a callable. Default 0.001.
      beta_1: decay of the first moment. Default 0.9.
      beta_2: decay of the second moment. Default 0.999.
      epsilon: epsilon hat. Default 1e-7.
      amsgrad: use AMSGrad. Default False.
      **kwargs: the base class's ``weight_decay``, ``clipnorm`` and the rest.
    """

    def __init__(
        self,
        learning_rate=0.001,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-7,
        amsgrad=False,
        name="adam",
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.amsgrad = bool(amsgrad)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._momentums, self._velocities = self.add_optimizer_variables(
            var_list, ["momentum", "velocity"]
        )
        self._velocity_hats = []
        if self.amsgrad:
            self._velocity_hats = self.add_optimizer_variables(var_list, "velocity_hat")

    def update_step(self, gradient, variable, learning_rate):
        var = as_tf_variable(variable)
        dtype = var.dtype
        m = self._slot(self._momentums, variable)
        v = self._slot(self._velocities, variable)
        lr = tf.cast(learning_rate, dtype)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        eps = tf.cast(self.epsilon, dtype)
        beta_1_power, beta_2_power = self._step_powers(dtype, self.beta_1, self.beta_2)
        if isinstance(gradient, tf.IndexedSlices):
            self._sparse_update(
                gradient, var, m, v, variable, lr, beta_1, beta_2, eps, beta_1_power, beta_2_power
            )
            return
        if not self.amsgrad and _elementwise_on_cpu(var):
            # The fused kernel's formula and order of operations: m and v
            # come out bit for bit the same, the weights within 2 units in
            # the last place (tests/test_optimizers.py).
            g = tf.cast(gradient, dtype)
            alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
            m.assign_add((g - m) * (1 - beta_1))
            v.assign_add((tf.square(g) - v) * (1 - beta_2))
            var.assign_sub(m * alpha / (tf.sqrt(v) + eps))
            return
        args = dict(
            var=var.handle,
            m=m.handle,
            v=v.handle,
            beta1_power=beta_1_power,
            beta2_power=beta_2_power,
            lr=lr,
            beta1=beta_1,
            beta2=beta_2,
            epsilon=eps,
            grad=tf.cast(gradient, dtype),
        )
        if self.amsgrad:
            v_hat = self._slot(self._velocity_hats, variable)
            tf.raw_ops.ResourceApplyAdamWithAmsgrad(vhat=v_hat.handle, **args)
        else:
            tf.raw_ops.ResourceApplyAdam(**args)

    def _sparse_update(
        self, gradient, var, m, v, variable, lr, beta_1, beta_2, eps, beta_1_power, beta_2_power
    ):
        values, indices = deduplicate(gradient)
        g = tf.cast(values, var.dtype)
        alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        m_rows = tf.gather(m, indices)
        m_rows = m_rows + (g - m_rows) * (1 - beta_1)
        v_rows = tf.gather(v, indices)
        v_rows = v_rows + (g * g - v_rows) * (1 - beta_2)
        m.scatter_update(tf.IndexedSlices(m_rows, indices))
        v.scatter_update(tf.IndexedSlices(v_rows, indices))
        if self.amsgrad:
            v_hat = self._slot(self._velocity_hats, variable)
            v_rows = tf.maximum(tf.gather(v_hat, indices), v_rows)
            v_hat.scatter_update(tf.IndexedSlices(v_rows, indices))
        var.scatter_sub(tf.IndexedSlices(m_rows * alpha / (tf.sqrt(v_rows) + eps), indices))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "amsgrad": self.amsgrad,
            }
        )
        return config
