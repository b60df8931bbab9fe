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


@pytest.mark.parametrize("shards", [2, 3, 7])
def test_a_sharded_table_is_the_same_table_with_sparse_gradients(shards):
    import tensorflow as tf

    whole = models.embedding_bag(input_shape=(16,), num_classes=4, seed=3, vocab_size=1001)
    split = models.embedding_bag(
        input_shape=(16,), num_classes=4, seed=3, vocab_size=1001, embedding_shards=shards
    )
    tables = [w for w in split.weights if w.path.startswith("embedding/")]
    assert [t.shape[0] for t in tables] == models.shard_rows(1001, shards)
    assert sum(t.shape[0] for t in tables) == 1001
    np.testing.assert_array_equal(
        np.concatenate([t.numpy() for t in tables]), whole.get_layer("embedding").embeddings.numpy()
    )
    ids = tf.constant(np.random.default_rng(0).integers(0, 1001, (8, 16)), tf.int32)
    np.testing.assert_array_equal(whole(ids).numpy(), split(ids).numpy())
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(split(ids) ** 2)
    grads = tape.gradient(loss, [t.value for t in tables])
    assert all(isinstance(g, tf.IndexedSlices) for g in grads)
    looked_up = sum(int(tf.size(tf.unique(g.indices)[0])) for g in grads)
    assert looked_up == len(np.unique(ids.numpy()))  # only the rows looked up


def test_shards_are_checked():
    from tftrain.config import ConfigError, ExperimentConfig

    with pytest.raises(ConfigError, match="--embedding_shards=2000: expected 1 to"):
        models.embedding_bag(
            input_shape=(16,), num_classes=4, seed=0, vocab_size=1000, embedding_shards=2000
        )
    with pytest.raises(ConfigError, match="--embedding_shards applies to --model=embedding_bag"):
        ExperimentConfig(model="mlp", embedding_shards=2, model_dir="/x").validate()
    with pytest.raises(ConfigError, match="--embedding_shards=0"):
        ExperimentConfig(model="embedding_bag", embedding_shards=0, model_dir="/x").validate()


@pytest.mark.parametrize(
    "name,options",
    [
        ("softmax", {}),
        ("mlp", {"hidden_units": (64, 32, 16)}),
        ("embedding_bag", {"vocab_size": 500}),
    ],
)
def test_the_parameter_count_is_known_before_building(name, options):
    shape = (16,) if name == "embedding_bag" else (28, 28, 1)
    built = models.build_model(name, input_shape=shape, num_classes=10, seed=0, **options)
    counted = models.parameter_count(name, input_shape=shape, num_classes=10, **options)
    assert counted == built.count_params()


def test_a_model_too_big_for_memory_is_refused_before_it_is_built():
    from tftrain.config import ConfigError

    shape = {"input_shape": (28, 28, 1), "num_classes": 10, "hidden_units": (1000,)}
    models.check_memory("mlp", 2, 4 * 795_010 * 4, **shape)  # fits exactly
    with pytest.raises(ConfigError, match="795,010 parameters.*more than the"):
        models.check_memory("mlp", 2, 4 * 795_010 * 4 - 1, **shape)
    models.check_memory("cnn", 2, 1, **shape)  # not estimated: never refused
