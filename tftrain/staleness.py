"""Update staleness under asynchronous SGD: for each applied update, how many
other updates landed between the step's read of the parameters and its write.

A shared counter of applied updates (a variable that lives with the
parameters) is read before the step reads any parameter, read again once
the step's writes are done, and then advanced by one. The difference of the
two reads is the step's staleness: 0 when no other worker wrote in between.
Counts per staleness value (``BUCKETS`` of them, the last one "that many or
more") and their exact sum are running statistics, summed over workers as
the task's are.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tftrain.trainer import Trainer, _stats_variable, gradient_tensor, unpack

# Staleness values counted one by one; larger ones share the last bucket.
BUCKETS = 64


def summarise(stats) -> dict:
    """``{"mean", "max", "updates", "histogram"}`` of counts and sum; ``max``
    is a lower bound when the last bucket ("BUCKETS - 1 or more") is used."""
    counts, total = np.asarray(stats[:BUCKETS]), float(stats[BUCKETS])
    updates = int(counts.sum())
    used = np.nonzero(counts)[0]
    return {
        "mean": total / updates if updates else 0.0,
        "max": int(used[-1]) if used.size else 0,
        "updates": updates,
        "histogram": [int(c) for c in counts[: (int(used[-1]) + 1 if used.size else 0)]],
    }


class StalenessTrainer(Trainer):
    """A trainer that measures each update's staleness (see the module's doc)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.strategy.scope():
            self.updates_applied = tf.Variable(
                0,
                dtype=tf.int64,
                trainable=False,
                name="updates_applied",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
            self._staleness = _stats_variable("staleness", BUCKETS + 1)
        self._run_totals = np.zeros(BUCKETS + 1)
        self._last = None

    def _replica_train_step(self, batch):
        before = self.updates_applied.read_value()
        gradients, stats = self.accumulate_gradients(*unpack(batch))
        self.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables))
        with tf.control_dependencies(
            [before, *(gradient_tensor(g) for g in gradients if g is not None)]
        ):
            after = self.updates_applied.read_value()
        with tf.control_dependencies([after]):
            self.updates_applied.assign_add(1)
        staleness = after - before
        bucket = tf.one_hot(tf.minimum(staleness, BUCKETS - 1), BUCKETS, dtype=tf.float32)
        self._staleness.assign_add(tf.concat([bucket, [tf.cast(staleness, tf.float32)]], 0))
        self.add_train_stats(stats)

    def take_train_metrics(self) -> dict[str, float]:
        metrics = super().take_train_metrics()
        stats = self._staleness.read_value().numpy()
        self._staleness.assign(tf.zeros([BUCKETS + 1]))
        self._run_totals += stats
        self._last = summarise(stats)
        metrics["staleness/mean"] = self._last["mean"]
        metrics["staleness/max"] = float(self._last["max"])
        return metrics

    def histograms(self) -> dict:
        """The staleness of each update since the last ``take_train_metrics``."""
        if not self._last or not self._last["updates"]:
            return {}
        counts = self._last["histogram"]
        return {"staleness": np.repeat(np.arange(len(counts)), counts)}

    def run_staleness(self) -> dict:
        """The staleness summary over every update this process saw."""
        return summarise(self._run_totals)
