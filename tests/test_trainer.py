"""The inner loop, in-process, on synthetic data."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tftrain import _internal, data, models, optimizers, resources, tasks
from tftrain.config import ExperimentConfig
from tftrain.distribute.base import mode_for
from tftrain.trainer import Trainer

TASK = tasks.classification_scorer()


IMAGES = {"input_shape": (28, 28, 1), "num_classes": 10, "hidden_units": (32,)}


def make(
    strategy,
    *,
    batch=32,
    model="mlp",
    optimizer="adam",
    seed=0,
    microbatches=1,
    lr=0.01,
    skip_nonfinite=False,
    **shape,
):
    with strategy.scope():
        m = models.build_model(model, seed=seed, **(shape or IMAGES))
        opt = optimizers.get(optimizer, learning_rate=lr)
        opt.build(m.trainable_variables)
    return Trainer(
        strategy=strategy,
        scorer=TASK,
        model=m,
        optimizer=opt,
        global_batch_size=batch,
        num_microbatches=microbatches,
        skip_nonfinite=skip_nonfinite,
    )


def mirrored(num_replicas=2):
    config = ExperimentConfig(
        strategy="mirrored", num_replicas=num_replicas, model_dir="/unused"
    ).validate()
    return mode_for(config)


def iterator(strategy, split, batch, start_step=0):
    ds = data.train_dataset(split, global_batch_size=batch, seed=0, start_step=start_step)
    return iter(strategy.experimental_distribute_dataset(ds))


@pytest.fixture(scope="module")
def synthetic():
    return data.make_synthetic(0, num_train=640, num_test=200)


def weights(trainer):
    return [w.numpy() for w in trainer.model.weights]


def test_training_reduces_the_loss_and_counts_steps(synthetic):
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    t = make(strategy)
    it = iterator(strategy, synthetic.train, 32)
    t.train(it, 5)
    first = t.take_train_metrics()
    t.train(it, 60)
    later = t.take_train_metrics()
    assert later["loss"] < first["loss"]
    assert first["examples"] == 5 * 32 and later["examples"] == 60 * 32
    assert int(t.global_step.numpy()) == 65
    assert int(t.optimizer.iterations.numpy()) == 65


def test_steps_per_loop_does_not_change_the_result(synthetic):
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    a, b = make(strategy), make(strategy)
    ia, ib = iterator(strategy, synthetic.train, 32), iterator(strategy, synthetic.train, 32)
    a.train(ia, 12)
    for n in (5, 4, 3):
        b.train(ib, n)
    for x, y in zip(weights(a), weights(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adagrad", "adam"])
def test_mirrored_two_replicas_equal_one_device(synthetic, optimizer):
    """Loss averaged over the global batch and gradients summed across replicas
    give the one-device update, to float32 rounding (the replicas' partial
    sums are added in a different order)."""
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    two = mirrored().setup().strategy  # tftrain's choices
    a, b = make(one, optimizer=optimizer), make(two, optimizer=optimizer)
    a.train(iterator(one, synthetic.train, 32), 50)
    b.train(iterator(two, synthetic.train, 32), 50)
    for x, y in zip(weights(a), weights(b)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    assert int(b.optimizer.iterations.numpy()) == 50
    eval_one = a.evaluate(
        one.experimental_distribute_dataset(data.eval_dataset(synthetic.test, batch_size=64))
    )
    eval_two = b.evaluate(
        two.experimental_distribute_dataset(data.eval_dataset(synthetic.test, batch_size=64))
    )
    assert eval_two["examples"] == 200  # the short last batch is counted once
    assert eval_two["loss"] == pytest.approx(eval_one["loss"], rel=1e-4)


def test_mirrored_on_cpu_sums_on_one_device():
    """TensorFlow's default for CPU devices is CollectiveAllReduce, measured
    ~2x slower per step than a plain sum on one device (BUILD_NOTES.md)."""
    strategy = mirrored().setup().strategy
    assert isinstance(_internal.cross_device_ops(strategy), tf.distribute.ReductionToOneDevice)
    assert strategy.num_replicas_in_sync == 2


def test_mirrored_on_cpu_gives_each_replica_its_share_of_the_cores():
    cores = resources.usable_cores()
    assert mirrored(2).default_threads() == (max(1, cores // 2), 0)
    assert mirrored(1).default_threads() == (0, 0)  # TensorFlow's default
    one = mode_for(ExperimentConfig(model_dir="/unused").validate())
    assert one.default_threads() == (0, 0)


def test_evaluate_matches_a_direct_computation(synthetic):
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    t = make(strategy)
    t.train(iterator(strategy, synthetic.train, 32), 10)
    got = t.evaluate(
        strategy.experimental_distribute_dataset(data.eval_dataset(synthetic.test, batch_size=64))
    )
    logits = t.model(synthetic.test.images.astype("float32")).numpy()
    loss = (
        keras.losses.sparse_categorical_crossentropy(
            synthetic.test.labels, logits, from_logits=True
        )
        .numpy()
        .mean()
    )
    accuracy = (logits.argmax(-1) == synthetic.test.labels).mean()
    assert got["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert got["accuracy"] == pytest.approx(float(accuracy))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_gradient_accumulation_equals_the_whole_batch(synthetic, optimizer):
    """Four micro-batches of 8 give the update of one batch of 32, to float32
    rounding (the slices' gradients are summed in a different order)."""
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    a, b = make(strategy, optimizer=optimizer), make(strategy, optimizer=optimizer, microbatches=4)
    a.train(iterator(strategy, synthetic.train, 32), 30)
    b.train(iterator(strategy, synthetic.train, 32), 30)
    for x, y in zip(weights(a), weights(b)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    assert b.take_train_metrics()["examples"] == 30 * 32
    assert not all(np.array_equal(x, y) for x, y in zip(weights(a), weights(make(strategy))))


def test_sparse_gradients_accumulate_over_micro_batches():
    tokens = data.make_synthetic_tokens(0, num_train=256, num_test=64, vocab_size=300)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    shape = {"input_shape": (16,), "num_classes": 4, "vocab_size": 300}

    def trainer(microbatches):
        return make(
            strategy,
            model="embedding_bag",
            optimizer="adagrad",
            lr=0.1,
            microbatches=microbatches,
            **shape,
        )

    a, b = trainer(1), trainer(4)
    a.train(iterator(strategy, tokens.train, 32), 20)
    b.train(iterator(strategy, tokens.train, 32), 20)
    for x, y in zip(weights(a), weights(b)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    assert a.take_train_metrics()["accuracy"] > 0.3


def _three_batches(nan_at=None, batch=32):
    rng = np.random.default_rng(0)
    x = rng.random((3 * batch, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 3 * batch).astype(np.int32)
    if nan_at is not None:
        x[nan_at, 0, 0, 0] = np.nan
    return x, y


def _train_on(strategy, x, y, *, skip, batch=32):
    t = make(strategy, batch=batch, optimizer="sgd", lr=0.1, skip_nonfinite=skip)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
    t.train(iter(strategy.experimental_distribute_dataset(ds)), len(x) // batch)
    return t


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_nonfinite_update_is_skipped_whole_on_every_replica(replicas):
    # One NaN pixel in the second batch's last example: under 2 replicas only
    # replica 1 sees it, and both must skip the update.
    strategy = (
        tf.distribute.OneDeviceStrategy("/cpu:0") if replicas == 1 else mirrored(2).setup().strategy
    )
    x, y = _three_batches(nan_at=63)
    skipped = _train_on(strategy, x, y, skip=True)
    metrics = skipped.take_train_metrics()
    assert metrics["nonfinite_steps"] == 1
    assert np.isfinite(metrics["loss"]) and metrics["gradient_norm"] > 0
    keep = np.r_[0:32, 64:96]
    reference = _train_on(strategy, x[keep], y[keep], skip=False)
    for got, want in zip(weights(skipped), weights(reference)):
        np.testing.assert_array_equal(got, want)


def test_without_skipping_a_nonfinite_update_is_counted_and_applied():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    x, y = _three_batches(nan_at=40)
    t = _train_on(strategy, x, y, skip=False)
    metrics = t.take_train_metrics()
    assert metrics["nonfinite_steps"] >= 1
    assert not all(np.isfinite(w).all() for w in weights(t))


def test_the_gradient_norm_is_the_global_norm_of_the_update():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    x, y = _three_batches()
    t = _train_on(strategy, x[:32], y[:32], skip=False)
    fresh = _train_on(strategy, x[:0], y[:0], skip=False)  # the same start, no step
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(TASK.per_example_loss(y[:32], fresh.model(x[:32], training=True)))
    want = tf.linalg.global_norm(tape.gradient(loss, fresh.model.trainable_variables))
    got = t.take_train_metrics()["gradient_norm"]
    assert got == pytest.approx(float(want), rel=1e-5)
