"""Augmentation in tftrain.data's training streams: each example's random
draw is a function of the run's seed, the epoch and the example's place in
the pass, so it is the same under any replica or pipeline count and after a
resume."""

import re

import numpy as np
import pytest
import tensorflow as tf

import tftrain
from tftrain import data, inputs

N = 96


def context(pipelines=1, index=0, replicas=1, start_step=0):
    return inputs.input_context(pipelines, index, replicas, start_step)


def noisy(x, y, seed):
    """Each example's value plus a draw from its seed; its label is its id."""
    return x + tf.random.stateless_uniform([], seed), y


def stream(ctx, steps, *, batch=8, seed=3, helper="arrays", shuffle_buffer=32, augment=noisy):
    config = tftrain.ExperimentConfig(batch_size=batch, seed=seed)
    ids = np.arange(N)
    if helper == "arrays":
        ds = data.from_arrays(
            ids.astype(np.float32), ids, config=config, context=ctx, training=True, augment=augment
        )
    else:
        examples = tf.data.Dataset.from_tensor_slices((ids.astype(np.float32), ids))
        ds = data.batches(
            examples,
            config=config,
            context=ctx,
            training=True,
            shuffle_buffer=shuffle_buffer,
            augment=augment,
        )
    return [(x.numpy(), y.numpy()) for x, y in ds.take(steps)]


def draws(batches):
    """id -> the draw it got, per step."""
    return [dict(zip(y.tolist(), (x - y).tolist())) for x, y in batches]


@pytest.mark.parametrize(
    "helper,shuffle_buffer", [("arrays", None), ("batches", 32), ("batches", 0)]
)
def test_each_example_gets_the_same_draw_under_any_pipeline_count_and_after_a_resume(
    helper, shuffle_buffer
):
    steps = 30  # past two epochs of 12 steps
    one = draws(stream(context(), steps, helper=helper, shuffle_buffer=shuffle_buffer))
    assert all(0 < d < 1 for step in one for d in step.values())
    halves = [
        draws(stream(context(2, i, 2), steps, helper=helper, shuffle_buffer=shuffle_buffer))
        for i in range(2)
    ]
    assert [{**a, **b} for a, b in zip(*halves)] == one
    resumed = draws(
        stream(context(start_step=17), steps - 17, helper=helper, shuffle_buffer=shuffle_buffer)
    )
    assert resumed == one[17:]
    epoch0 = {k: v for step in one[:12] for k, v in step.items()}
    epoch1 = {k: v for step in one[12:24] for k, v in step.items()}
    assert set(epoch0) == set(epoch1) == set(range(N))
    assert all(epoch0[k] != epoch1[k] for k in range(N))
    other = draws(stream(context(), 12, seed=4, helper=helper, shuffle_buffer=shuffle_buffer))
    other0 = {k: v for step in other for k, v in step.items()}
    assert all(other0[k] != epoch0[k] for k in range(N))


def test_evaluation_is_not_augmented():
    config = tftrain.ExperimentConfig(batch_size=4, eval_batch_size=4, seed=0)
    images = np.ones((16, 6, 6, 1), np.float32)
    labels = np.arange(16)

    def shift(image, label, seed):
        pad = [[2, 2], [2, 2], [0, 0]]
        return tf.image.stateless_random_crop(tf.pad(image, pad), [6, 6, 1], seed), label

    kwargs = dict(config=config, context=context(), augment=shift)
    x, _ = next(iter(data.from_arrays(images, labels, training=True, **kwargs)))
    assert x.shape == (4, 6, 6, 1) and float(tf.reduce_min(x)) == 0.0  # some padding came in
    x, _ = next(iter(data.from_arrays(images, labels, training=False, **kwargs)))
    assert x.shape == (4, 6, 6, 1) and float(tf.reduce_min(x)) == 1.0


def to_float(x, y, seed):
    return tf.cast(x, tf.float32) / 255, y


def crop(x, y, seed):
    return x[:4, :4], y


def image_only(x, y, seed):
    return x


def stateful(x, y, seed):
    return x + tf.cast(tf.random.uniform([], 0, 2, tf.int32), x.dtype), y


@pytest.mark.parametrize(
    "augment, said",
    [
        (to_float, "into (float32[6, 6, 1], int64[])"),
        (crop, "into (uint8[4, 4, 1], int64[])"),
        (image_only, "must give the example back"),
        (stateful, "augment=stateful draws with RandomUniformInt"),
    ],
)
def test_an_augmentation_that_changes_the_example_or_keeps_state_is_one_line(augment, said):
    config = tftrain.ExperimentConfig(batch_size=4, seed=0)
    images = np.ones((16, 6, 6, 1), np.uint8)
    with pytest.raises(tftrain.DataError, match=re.escape(said)):
        data.from_arrays(
            images, np.arange(16), config=config, context=context(), training=True, augment=augment
        )


def test_an_exception_in_an_augmentation_names_it_and_its_message():
    def broken(x, y, seed):
        raise ValueError("my augment is broken")

    config = tftrain.ExperimentConfig(batch_size=4, seed=0)
    with pytest.raises(tftrain.UserCodeError) as raised:
        data.from_arrays(
            np.ones((16, 6, 6, 1), np.uint8),
            np.arange(16),
            config=config,
            context=context(),
            training=True,
            augment=broken,
        )
    assert str(raised.value).startswith("augment=broken raised ValueError")
    assert "my augment is broken" in str(raised.value)
