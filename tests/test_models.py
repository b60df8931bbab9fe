import numpy as np
import pytest

from tftrain import models


@pytest.mark.parametrize("name", ["softmax", "mlp", "cnn"])
def test_models_map_images_to_logits(name):
    model = models.build_model(name, input_shape=(28, 28, 1), num_classes=10, seed=0)
    x = np.random.default_rng(0).uniform(0, 255, (3, 28, 28, 1)).astype("float32")
    assert model(x).shape == (3, 10)


def test_softmax_is_linear_regression_from_zero():
    model = models.build_model("softmax", input_shape=(28, 28, 1), num_classes=10, seed=0)
    assert [tuple(w.shape) for w in model.trainable_weights] == [(784, 10), (10,)]
    assert all(not np.any(w.numpy()) for w in model.trainable_weights)


def test_seed_fixes_the_initial_weights():
    def weights(seed):
        m = models.build_model(
            "mlp", input_shape=(28, 28, 1), num_classes=10, seed=seed, hidden_units=(16,)
        )
        return [w.numpy() for w in m.trainable_weights]

    for a, b in zip(weights(1), weights(1)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(weights(1)[0], weights(2)[0])


def test_unknown_model():
    with pytest.raises(ValueError, match="model='vgg'"):
        models.build_model("vgg", input_shape=(28, 28, 1), num_classes=10, seed=0)
