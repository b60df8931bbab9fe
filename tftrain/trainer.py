"""The inner loop: training and evaluation steps, written once for every strategy.

``Trainer.train(iterator, num_steps)`` runs ``num_steps`` steps inside one
``tf.function`` call; each step runs the replica step under
``strategy.run``. The loss of each replica is its share of the mean over
the *global* batch, because Keras 3 optimizers sum gradients across
replicas. With ``num_microbatches = M > 1`` each replica's batch is cut into
M slices whose gradients are summed before one update (gradient
accumulation); M = 1 is the plain step. Running statistics (the task's)
live in sync-on-read variables, so one read after a loop sums them over
every replica and worker.

``Trainer.loop`` is a plain function of an iterator and a step count, so a
``ClusterCoordinator`` can ``schedule`` it as it is.
"""

from __future__ import annotations

import tensorflow as tf


def _stats_variable(name: str, size: int) -> tf.Variable:
    return tf.Variable(
        tf.zeros([size], tf.float32),
        trainable=False,
        name=name,
        synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=tf.VariableAggregation.SUM,
    )


def gradient_tensor(gradient):
    """The tensor a gradient is made of: its values for ``tf.IndexedSlices``
    (what a control dependency on a sparse gradient needs)."""
    return gradient.values if isinstance(gradient, tf.IndexedSlices) else gradient


def unpack(batch):
    """``(features, labels, weights)`` of a batch of ``(features, labels[, weights])``."""
    if len(batch) == 2:
        return batch[0], batch[1], None
    return batch


def split_batch(batch, m: int):
    """``m`` equal slices of a batch (any structure; None stays None)."""
    flat = tf.nest.flatten(batch)
    pieces = [[None] * m if t is None else tf.split(t, m) for t in flat]
    return [tf.nest.pack_sequence_as(batch, [p[i] for p in pieces]) for i in range(m)]


def _accumulate(total, gradient):
    if total is None or gradient is None:
        return gradient if total is None else total
    if isinstance(total, tf.IndexedSlices) or isinstance(gradient, tf.IndexedSlices):
        total, gradient = (
            g if isinstance(g, tf.IndexedSlices) else tf.IndexedSlices(g, tf.range(tf.shape(g)[0]))
            for g in (total, gradient)
        )
        return tf.IndexedSlices(
            tf.concat([total.values, gradient.values], 0),
            tf.concat([total.indices, gradient.indices], 0),
            total.dense_shape,
        )
    return total + gradient


class Trainer:
    """Training and evaluation steps for one model under one strategy.

    Args:
      strategy: the tf.distribute strategy; model and optimizer variables
        must have been created under its scope.
      scorer: the loss and the statistics of the outputs (tftrain.tasks.Scorer).
      model: a Keras 3 model.
      optimizer: a Keras 3 optimizer, already built on the model's variables.
      global_batch_size: examples per step over all replicas.
      num_microbatches: slices of each replica's batch per update.
      gradient_reducer: sums the gradients across workers instead of the
        strategy (tftrain.distribute.ring.RingAllReduce); needs one of
        tftrain's optimizers.
      local_replicas: the replicas of this process, whose per-replica
        batches each training element stacks (1: one batch, not stacked).
      skip_nonfinite: skip an update whose gradients hold a NaN or infinity
        instead of applying it (and leave a batch whose loss is not finite
        out of the loss and accuracy). Either way such updates are counted
        (``take_train_metrics``'s ``nonfinite_steps``).

    With one of tftrain's optimizers the trainer also measures the global
    norm of each update's gradients (summed over replicas), as
    ``gradient_norm``: the mean over the finite updates since the last
    ``take_train_metrics`` (a sparse gradient counts its rows as sent).
    """

    def __init__(
        self,
        *,
        strategy,
        scorer,
        model,
        optimizer,
        global_batch_size: int,
        num_microbatches: int = 1,
        gradient_reducer=None,
        skip_nonfinite: bool = False,
        local_replicas: int = 1,
    ):
        ours = hasattr(optimizer, "gradient_observer")
        if (gradient_reducer is not None or skip_nonfinite) and not ours:
            raise TypeError(
                f"{type(optimizer).__name__} cannot take tftrain's gradient ring or skip "
                "updates: use one of tftrain.optimizers"
            )
        if gradient_reducer is not None:
            optimizer.gradient_reducer = gradient_reducer
        if ours:
            optimizer.gradient_observer = self._watch_gradients
            optimizer.skip_nonfinite = bool(skip_nonfinite)
        self.skip_nonfinite = bool(skip_nonfinite)
        # Training batches come stacked, one per replica of this process
        # (ParallelMode.distribute_train), when it has several.
        self.local_replicas = int(local_replicas)
        self.strategy, self.scorer = strategy, scorer
        self.model, self.optimizer = model, optimizer
        self.global_batch_size = int(global_batch_size)
        self.num_microbatches = int(num_microbatches)
        with strategy.scope():
            self.global_step = tf.Variable(
                0,
                dtype=tf.int64,
                trainable=False,
                name="global_step",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
            self._train_stats = _stats_variable("train_stats", scorer.num_stats)
            self._eval_stats = _stats_variable("eval_stats", scorer.num_stats)
            # Sum of finite gradient norms, finite updates, non-finite updates.
            self._update_stats = _stats_variable("update_stats", 3)
        self.loop = tf.function(self._train_loop, reduce_retracing=True)
        self._probe = None  # probe_gradients' function, built on first use
        self._eval_fn = tf.function(self._eval_step, reduce_retracing=True)

    # -- training --------------------------------------------------------

    def compute_gradients(self, inputs, labels, weights=None, *, with_regularization: bool = True):
        """Gradients of this slice's share of the global-batch loss, and its statistics."""
        with tf.GradientTape() as tape:
            outputs = self.model(inputs, training=True)
            per_example = self.scorer.per_example_loss(labels, outputs, weights)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.global_batch_size)
            if with_regularization and self.model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(self.model.losses))
        gradients = tape.gradient(loss, self.model.trainable_variables)
        return gradients, self.scorer.batch_stats(labels, outputs, per_example, weights)

    def accumulate_gradients(self, inputs, labels, weights=None):
        """The gradients of one update on this replica's batch, and its statistics:
        the sum over ``num_microbatches`` slices, in slice order. A pipeline
        overrides this (tftrain.pipeline)."""
        m = self.num_microbatches
        if m == 1:
            return self.compute_gradients(inputs, labels, weights)
        gradients, stats = None, None
        for i, (x, y, w) in enumerate(split_batch((inputs, labels, weights), m)):
            g, s = self.compute_gradients(x, y, w, with_regularization=i == 0)
            gradients = g if gradients is None else list(map(_accumulate, gradients, g))
            stats = s if stats is None else stats + s
        return gradients, stats

    def _watch_gradients(self, grads_and_vars):
        """The optimizer's look at the summed gradients (in replica context,
        every replica seeing the same ones): their norm and whether they are
        finite, counted once over the replicas."""
        norm = tf.linalg.global_norm([gradient_tensor(g) for g, _ in grads_and_vars])
        norm = tf.cast(norm, tf.float32)  # (float64 under --precision=float64)
        finite = tf.math.is_finite(norm)
        share = 1.0 / tf.distribute.get_replica_context().num_replicas_in_sync
        self._update_stats.assign_add(
            tf.stack(
                [
                    tf.where(finite, norm, 0.0) * share,
                    tf.cast(finite, tf.float32) * share,
                    tf.cast(tf.logical_not(finite), tf.float32) * share,
                ]
            )
        )
        if not self.skip_nonfinite:
            return grads_and_vars
        # All or nothing: one non-finite gradient makes every one NaN, so the
        # optimizer skips every variable of this update (Optimizer.skip_nonfinite).
        poison = tf.where(finite, 1.0, float("nan"))

        def poisoned(g):
            if isinstance(g, tf.IndexedSlices):
                values = g.values * tf.cast(poison, g.dtype)
                return tf.IndexedSlices(values, g.indices, g.dense_shape)
            return g * tf.cast(poison, g.dtype)

        return [(poisoned(g), v) for g, v in grads_and_vars]

    def add_train_stats(self, stats) -> None:
        """Adds a batch's statistics; under ``skip_nonfinite`` a batch whose
        statistics are not finite is left out."""
        if self.skip_nonfinite:
            stats = tf.where(tf.reduce_all(tf.math.is_finite(stats)), stats, tf.zeros_like(stats))
        self._train_stats.assign_add(stats)

    def _replica_train_step(self, batch):
        gradients, stats = self.accumulate_gradients(*unpack(batch))
        self.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables))
        self.add_train_stats(stats)

    def _replica_batch_step(self, batch):
        if self.local_replicas > 1:  # this replica's slice of the stacked batches
            context = tf.distribute.get_replica_context()
            index = context.replica_id_in_sync_group % self.local_replicas
            batch = tf.nest.map_structure(lambda t: t[index], batch)
        return self._replica_train_step(batch)

    def _train_loop(self, iterator, num_steps):
        done = tf.constant(0, tf.int64)
        for _ in tf.range(num_steps):
            self.strategy.run(self._replica_batch_step, args=(next(iterator),))
            done += 1
        # ``done`` leaves the loop only when its steps have run: the step
        # count cannot run ahead of the updates, even where the variables
        # live on other tasks.
        self.global_step.assign_add(done)

    def train(self, iterator, num_steps: int) -> None:
        """Runs ``num_steps`` training steps in one graph call."""
        self.loop(iterator, tf.constant(num_steps, tf.int64))

    def probe_gradients(self, batch) -> list:
        """The gradients of one batch at the current weights, computed in this
        process and not applied (for histograms). The training-mode pass
        moves the model's non-trainable state (BatchNorm's moving averages,
        a dropout layer's seed): it is put back, so that looking does not
        change the run."""
        if self._probe is None:
            self._probe = tf.function(lambda b: self.compute_gradients(*unpack(b))[0])
        state = [(v, tf.identity(v.value)) for v in self.model.non_trainable_variables]
        gradients = self._probe(batch)
        for variable, value in state:
            variable.assign(value)
        return gradients

    def timings(self) -> dict[str, float]:
        """Timings of the step's parts worth a chart (a pipeline's stages); none here."""
        return {}

    def histograms(self) -> dict:
        """Values of the last interval worth a histogram (tag -> array); none here."""
        return {}

    def take_train_metrics(self) -> dict[str, float]:
        """The task's metrics since the last call, over every replica."""
        stats = self._train_stats.read_value().numpy()
        self._train_stats.assign(tf.zeros([self.scorer.num_stats]))
        metrics = self.scorer.summarise(stats)
        norms, finite, nonfinite = self._update_stats.read_value().numpy()
        self._update_stats.assign(tf.zeros([3]))
        if round(finite) or round(nonfinite):  # measured (one of tftrain's optimizers)
            metrics["gradient_norm"] = float(norms / finite) if round(finite) else float("nan")
            metrics["nonfinite_steps"] = int(round(nonfinite))
        return metrics

    # -- evaluation ------------------------------------------------------

    def outputs(self, inputs, training: bool = False):
        """The model's outputs for ``inputs`` (a pipeline runs them stage by stage)."""
        return self.model(inputs, training=training)

    def _replica_eval_step(self, batch):
        inputs, labels, weights = unpack(batch)
        outputs = self.outputs(inputs)
        per_example = self.scorer.per_example_loss(labels, outputs, weights)
        self._eval_stats.assign_add(self.scorer.batch_stats(labels, outputs, per_example, weights))

    def _replica_eval_step_if_any(self, batch):
        # The last batch of an evaluation can leave a replica with no
        # examples; some kernels (oneDNN's convolutions) fail on an empty batch.
        examples = tf.shape(tf.nest.flatten(batch)[0])[0]
        tf.cond(examples > 0, lambda: self._replica_eval_step(batch) or tf.no_op(), tf.no_op)

    def _eval_step(self, batch, in_replica=True):
        if in_replica and self.strategy.num_replicas_in_sync > 1:
            self.strategy.run(self._replica_eval_step_if_any, args=(batch,))
        elif in_replica:
            self.strategy.run(self._replica_eval_step, args=(batch,))
        else:  # here, reading the variables wherever they live
            self._replica_eval_step(batch)

    def evaluate(self, dataset, in_replica: bool = True) -> dict[str, float]:
        """The task's metrics over the whole evaluation set: distributed over
        the replicas, or (``in_replica=False``) computed in this process."""
        self._eval_stats.assign(tf.zeros([self.scorer.num_stats]))
        for batch in dataset:
            self._eval_fn(batch, in_replica)
        return self.scorer.summarise(self._eval_stats.read_value().numpy())
