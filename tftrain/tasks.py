"""Tasks: what is learned. A task builds the model, scores its outputs (the
per-example loss and the statistics behind the reported metrics) and names
the serving signature; the loop, strategies and actions never look inside.

Tasks are registered in :data:`tftrain.plugins.TASKS`. Statistics are a
float32 vector per batch, summed over batches, replicas and workers, so any
strategy can aggregate them with one sum.
"""

from __future__ import annotations

from tftrain import models


class Classification:
    """Inputs (images or token ids) to class logits; softmax cross-entropy.

    Metrics: ``loss`` (mean cross-entropy), ``accuracy``, ``examples``.
    """

    name = "classification"
    num_stats = 3  # [sum of per-example losses, correct predictions, examples]

    def __init__(self, config, dataset):
        self.config, self.dataset = config, dataset

    def build_model(self):
        import keras

        config, dataset = self.config, self.dataset
        # The policy of every layer built from here on (Keras's global setting).
        keras.mixed_precision.set_dtype_policy(
            "mixed_bfloat16" if config.precision == "bfloat16" else "float32"
        )
        return models.build_model(
            config.model,
            input_shape=dataset.image_shape,
            num_classes=dataset.num_classes,
            seed=config.seed,
            hidden_units=config.mlp_hidden_units,
            vocab_size=dataset.vocab_size,
            embedding_shards=config.embedding_shards or 1,
        )

    def per_example_loss(self, labels, outputs):
        import tensorflow as tf

        return tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(labels, tf.int32), logits=tf.cast(outputs, tf.float32)
        )

    def batch_stats(self, labels, outputs, per_example_loss):
        import tensorflow as tf

        predicted = tf.argmax(outputs, axis=-1, output_type=tf.int32)
        correct = tf.equal(predicted, tf.cast(labels, tf.int32))
        return tf.stack(
            [
                tf.reduce_sum(per_example_loss),
                tf.reduce_sum(tf.cast(correct, tf.float32)),
                tf.cast(tf.size(labels), tf.float32),
            ]
        )

    @staticmethod
    def summarise(stats) -> dict[str, float]:
        loss_sum, correct, count = (float(x) for x in stats)
        count = max(count, 1.0)
        return {"loss": loss_sum / count, "accuracy": correct / count, "examples": count}

    def serving_input(self):
        """The name, dtype and per-example shape of the serving signature's input."""
        name = "tokens" if self.dataset.vocab_size else "images"
        return name, self.dataset.input_dtype, self.dataset.image_shape


def from_config(config, dataset):
    from tftrain import plugins

    return plugins.TASKS.get(config.task)(config, dataset)
