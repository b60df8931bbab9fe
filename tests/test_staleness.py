"""Update staleness (parameter servers): the counting, checked where the
number of concurrent updates is known because the test makes them."""

import numpy as np
import pytest
import tensorflow as tf

from tftrain import data, models, optimizers, staleness, tasks
from tftrain.trainer import Trainer

TASK = tasks.classification_scorer()


class InterruptedTrainer(staleness.StalenessTrainer):
    """Another worker's ``others`` updates land while each step computes."""

    others = 0

    def accumulate_gradients(self, inputs, labels, weights=None):
        gradients, stats = super().accumulate_gradients(inputs, labels, weights)
        if self.others:
            with tf.control_dependencies([g for g in gradients if g is not None]):
                self.updates_applied.assign_add(self.others)
        return gradients, stats


def make(cls, others=0):
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        model = models.build_model(
            "mlp", input_shape=(28, 28, 1), num_classes=10, hidden_units=(16,), seed=0
        )
        optimizer = optimizers.get("adam", learning_rate=0.01)
        optimizer.build(model.trainable_variables)
    trainer = cls(
        strategy=strategy, scorer=TASK, model=model, optimizer=optimizer, global_batch_size=32
    )
    trainer.others = others
    split = data.make_synthetic(0, num_train=320, num_test=10).train
    batches = iter(data.train_dataset(split, global_batch_size=32, seed=0))
    return trainer, batches


@pytest.mark.parametrize("others", [0, 1, 3, 70])
def test_each_update_counts_the_updates_that_landed_while_it_computed(others):
    trainer, batches = make(InterruptedTrainer, others)
    trainer.train(batches, 10)
    metrics = trainer.take_train_metrics()
    expected = min(others, staleness.BUCKETS - 1)  # 70: in the last bucket, "63 or more"
    assert metrics["staleness/max"] == expected
    assert metrics["staleness/mean"] == others  # the mean is exact
    run = trainer.run_staleness()
    assert run["updates"] == 10 and run["histogram"][expected] == 10
    assert sum(run["histogram"]) == 10
    hist = trainer.histograms()
    assert sorted(hist) == ["staleness"] and list(hist["staleness"]) == [expected] * 10


def test_counting_does_not_change_the_training():
    counted, batches = make(staleness.StalenessTrainer)
    counted.train(batches, 10)
    plain, batches = make(Trainer)
    plain.train(batches, 10)
    for a, b in zip(counted.model.weights, plain.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_the_summary_of_counts():
    counts = [5, 0, 2] + [0] * (staleness.BUCKETS - 3) + [4.0]  # sum of staleness: 4
    assert staleness.summarise(np.array(counts, float)) == {
        "mean": 4 / 7,
        "max": 2,
        "updates": 7,
        "histogram": [5, 0, 2],
    }
    empty = staleness.summarise(np.zeros(staleness.BUCKETS + 1))
    assert empty == {"mean": 0.0, "max": 0, "updates": 0, "histogram": []}
