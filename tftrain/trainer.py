"""The inner loop: training and evaluation steps, written once for every strategy.

``Trainer.train(iterator, num_steps)`` runs ``num_steps`` steps inside one
``tf.function`` call; each step runs the replica step under
``strategy.run``. The loss of each replica is its share of the mean over
the *global* batch, because Keras 3 optimizers sum gradients across
replicas. Running statistics live in sync-on-read variables, so one read
after a loop sums them over every replica and worker.

A loop is a plain function of an iterator and a step count, so a
``ClusterCoordinator`` can ``schedule`` it as it is.
"""

from __future__ import annotations

import tensorflow as tf


def _stats_variable(name: str) -> tf.Variable:
    # [sum of per-example losses, correct predictions, examples]
    return tf.Variable(
        tf.zeros([3], tf.float32),
        trainable=False,
        name=name,
        synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=tf.VariableAggregation.SUM,
    )


def _batch_stats(logits, labels, per_example_loss):
    correct = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), tf.cast(labels, tf.int32))
    return tf.stack(
        [
            tf.reduce_sum(per_example_loss),
            tf.reduce_sum(tf.cast(correct, tf.float32)),
            tf.cast(tf.size(labels), tf.float32),
        ]
    )


def _summarise(stats) -> dict[str, float]:
    loss_sum, correct, count = (float(x) for x in stats)
    count = max(count, 1.0)
    return {"loss": loss_sum / count, "accuracy": correct / count, "examples": count}


class Trainer:
    """Training and evaluation steps for one model under one strategy.

    Args:
      strategy: the tf.distribute strategy; model and optimizer variables
        must have been created under its scope.
      model: a Keras 3 model mapping images to logits.
      optimizer: a Keras 3 optimizer, already built on the model's variables.
      global_batch_size: examples per step over all replicas.
      gradient_reducer: sums the gradients across workers instead of the
        strategy (tftrain.distribute.ring.RingAllReduce); needs one of
        tftrain's optimizers.
    """

    def __init__(
        self, *, strategy, model, optimizer, global_batch_size: int, gradient_reducer=None
    ):
        if gradient_reducer is not None:
            if not hasattr(optimizer, "gradient_reducer"):
                raise TypeError(
                    f"{type(optimizer).__name__} cannot take tftrain's gradient ring: "
                    "use one of tftrain.optimizers"
                )
            optimizer.gradient_reducer = gradient_reducer
        self.strategy = strategy
        self.model = model
        self.optimizer = optimizer
        self.global_batch_size = int(global_batch_size)
        with strategy.scope():
            self.global_step = tf.Variable(
                0,
                dtype=tf.int64,
                trainable=False,
                name="global_step",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
            self._train_stats = _stats_variable("train_stats")
            self._eval_stats = _stats_variable("eval_stats")
        self._train_fn = tf.function(self._train_loop, reduce_retracing=True)
        self._eval_fn = tf.function(self._eval_step, reduce_retracing=True)

    # -- training --------------------------------------------------------

    def _replica_train_step(self, images, labels):
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            logits = self.model(images, training=True)
            per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=tf.cast(labels, tf.int32), logits=tf.cast(logits, tf.float32)
            )
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.global_batch_size)
            if self.model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(self.model.losses))
        gradients = tape.gradient(loss, variables)
        self.optimizer.apply_gradients(zip(gradients, variables))
        self._train_stats.assign_add(_batch_stats(logits, labels, per_example))

    def _train_loop(self, iterator, num_steps):
        for _ in tf.range(num_steps):
            images, labels = next(iterator)
            self.strategy.run(self._replica_train_step, args=(images, labels))
        self.global_step.assign_add(tf.cast(num_steps, tf.int64))

    def train(self, iterator, num_steps: int) -> None:
        """Runs ``num_steps`` training steps in one graph call."""
        self._train_fn(iterator, tf.constant(num_steps, tf.int64))

    def take_train_metrics(self) -> dict[str, float]:
        """Mean loss and accuracy since the last call, over every replica."""
        stats = self._train_stats.read_value().numpy()
        self._train_stats.assign(tf.zeros([3]))
        return _summarise(stats)

    # -- evaluation ------------------------------------------------------

    def _replica_eval_step(self, images, labels):
        logits = self.model(images, training=False)
        per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(labels, tf.int32), logits=tf.cast(logits, tf.float32)
        )
        self._eval_stats.assign_add(_batch_stats(logits, labels, per_example))

    def _eval_step(self, batch):
        images, labels = batch
        self.strategy.run(self._replica_eval_step, args=(images, labels))

    def evaluate(self, distributed_dataset) -> dict[str, float]:
        """Loss and accuracy over the whole (distributed) evaluation set."""
        self._eval_stats.assign(tf.zeros([3]))
        for batch in distributed_dataset:
            self._eval_fn(batch)
        return _summarise(self._eval_stats.read_value().numpy())
