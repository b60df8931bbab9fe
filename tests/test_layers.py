"""tftrain.layers.FusedBatchNormalization against keras.layers.BatchNormalization."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tftrain.layers import FusedBatchNormalization


def _pair(shape, **kwargs):
    """A Keras BatchNormalization and a fused one with the same weights."""
    layers = keras.layers.BatchNormalization(**kwargs), FusedBatchNormalization(**kwargs)
    rng = np.random.default_rng(1)
    for layer in layers:
        layer.build(shape)
    weights = [rng.normal(size=w.shape).astype("float32") for w in layers[0].weights]
    weights = [
        np.abs(w) + 0.5 if "variance" in v.path else w for w, v in zip(weights, layers[0].weights)
    ]
    for layer in layers:
        layer.set_weights(weights)
    return layers


def _train_step(layer, x):
    """One training call's output, its gradients (inputs, then the layer's
    trainable weights) under a loss that weights every element differently,
    and the moving averages after it."""
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * tf.sin(x))
    grads = tape.gradient(loss, [x, *layer.trainable_weights])
    return [
        y.numpy(),
        *(g.numpy() for g in grads),
        *(v.numpy() for v in layer.non_trainable_weights),
    ]


@pytest.mark.parametrize(
    "shape, kwargs",
    [
        ((8, 5, 5, 3), {}),
        ((16, 4, 4, 7), {"momentum": 0.9, "epsilon": 1e-5}),
        ((4, 3, 3, 6), {"center": False}),
        ((4, 3, 3, 6), {"scale": False, "momentum": 0.5}),
        ((2, 1, 1, 4), {}),
    ],
)
def test_a_fused_training_step_is_keras_batchnorm(shape, kwargs):
    x = (np.random.default_rng(0).normal(size=shape) * 3 + 1).astype("float32")
    keras_bn, fused = _pair(shape, **kwargs)
    for _ in range(2):  # the second step starts from the updated moving averages
        expected, got = _train_step(keras_bn, x), _train_step(fused, x)
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-5)
    # Inference normalizes with the moving averages both layers updated.
    np.testing.assert_allclose(
        fused(x, training=False).numpy(), keras_bn(x, training=False).numpy(), rtol=2e-5, atol=2e-5
    )


def _op_types(layer, x, training):
    fn = tf.function(lambda x: layer(x, training=training))
    graph = fn.get_concrete_function(tf.TensorSpec(x.shape, x.dtype)).graph
    return {op.type for op in graph.get_operations()}


def test_training_on_float32_images_runs_the_fused_kernel():
    layer = FusedBatchNormalization()
    x = np.zeros((2, 3, 3, 4), "float32")
    assert "FusedBatchNormV3" in _op_types(layer, x, training=True)
    assert "FusedBatchNormV3" not in _op_types(layer, x, training=False)


@pytest.mark.parametrize(
    "case",
    ["synchronized", "rank 2", "axis 1", "bfloat16", "small epsilon", "mask", "frozen"],
)
def test_what_cannot_be_fused_runs_keras_own_path(case):
    shape, kwargs, dtype, mask = (4, 3, 3, 5), {}, "float32", None
    if case == "synchronized":
        kwargs = {"synchronized": True}
    elif case == "rank 2":
        shape = (6, 5)
    elif case == "axis 1":
        kwargs = {"axis": 1}
    elif case == "bfloat16":  # computing in bfloat16: Keras's path normalizes in float32
        kwargs, dtype = {"dtype": "mixed_bfloat16"}, "bfloat16"
    elif case == "small epsilon":
        kwargs = {"epsilon": 1e-6}
    elif case == "mask":
        shape, mask = (4, 3, 5), np.array([[1, 1, 0]] * 4, bool)
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    x = tf.cast(x, dtype)
    keras_bn, fused = _pair(shape, **kwargs)
    if case == "frozen":
        keras_bn.trainable = fused.trainable = False
    if mask is None:
        assert "FusedBatchNormV3" not in _op_types(fused, x, training=True)
    np.testing.assert_array_equal(
        tf.cast(fused(x, training=True, mask=mask), "float32").numpy(),
        tf.cast(keras_bn(x, training=True, mask=mask), "float32").numpy(),
    )
    for e, g in zip(keras_bn.non_trainable_weights, fused.non_trainable_weights):
        np.testing.assert_array_equal(g.numpy(), e.numpy())


def test_a_model_with_it_comes_back_from_its_config_and_keras_weights():
    def build(bn):
        inputs = keras.Input((4, 4, 2))
        return keras.Model(inputs, bn(name="bn")(keras.layers.Conv2D(3, 1)(inputs)))

    fused_model = build(FusedBatchNormalization)
    again = keras.Model.from_config(fused_model.get_config())
    assert type(again.get_layer("bn")) is FusedBatchNormalization
    # The same weights as Keras's layer, in the same order: either loads the other's.
    keras_model = build(keras.layers.BatchNormalization)
    keras_model.get_layer("bn").moving_variance.assign([2.0, 3.0, 4.0])
    fused_model.set_weights(keras_model.get_weights())
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 2)).astype("float32")
    np.testing.assert_array_equal(fused_model(x).numpy(), keras_model(x).numpy())
