"""Keras layers that tftrain's experiments use and users may too.

``FusedBatchNormalization`` is ``keras.layers.BatchNormalization`` that
trains with TensorFlow's fused batch-normalization kernel where it can.
Keras 3 computes a BatchNormalization on TensorFlow as separate moment,
normalization and gradient ops; the fused kernel does the statistics and
the normalization, and their gradient, in one op each (BUILD_NOTES.md,
"A fused BatchNorm").
"""

from __future__ import annotations

import keras
import tensorflow as tf

# The fused kernel's smallest epsilon (cuDNN's bound, which TensorFlow's own
# wrapper raises smaller values to); below it, Keras's path keeps the
# user's epsilon exactly.
_MIN_EPSILON = 1.001e-5


@keras.saving.register_keras_serializable(package="tftrain")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization``, fused when training images.

    Takes the same arguments and has the same weights, so a checkpoint or
    saved model of either restores into the other. A training call on a
    float32 batch of images (rank 4, channels last) runs TensorFlow's fused
    kernel; every other call runs Keras's own: inference (the moving
    averages), a mask, ``synchronized=True`` (``--sync_batchnorm``), renorm,
    another rank or axis, another dtype (bfloat16 and float16 are normalized
    in float32 there), an epsilon under 1.001e-5.

    Where fused, it computes what Keras's path does, to float32 rounding:
    the batch's mean and its biased variance (divided by the count, not one
    less), the same normalization, and the moving averages updated as
    ``moving * momentum + batch * (1 - momentum)``.
    """

    def _fusable(self, inputs, mask) -> bool:
        return (
            mask is None
            and not self.synchronized
            and not self.renorm
            and len(inputs.shape) == 4
            and self.axis in (3, -1)
            and inputs.dtype == tf.float32
            and self.moving_mean.dtype == "float32"
            and self.epsilon >= _MIN_EPSILON
        )

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable and self._fusable(inputs, mask)):
            return super().call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        scale = self.gamma if self.scale else tf.ones([channels])
        offset = self.beta if self.center else tf.zeros([channels])
        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            inputs,
            tf.convert_to_tensor(scale),
            tf.convert_to_tensor(offset),
            epsilon=self.epsilon,
            data_format="NHWC",
            is_training=True,
        )
        # The kernel returns the variance divided by count - 1 (for a
        # running estimate); Keras's moving average takes the batch's own.
        count = tf.cast(tf.size(inputs) // channels, tf.float32)
        variance = variance * (tf.maximum(count - 1.0, 1.0) / count)
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            self.moving_variance * self.momentum + variance * (1.0 - self.momentum)
        )
        return outputs
