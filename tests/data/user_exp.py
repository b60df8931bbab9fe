"""A user's experiment, as someone who has never seen tftrain's code would
write it: their own Keras models and custom layers, their own files.

The tests copy this file into a folder outside the repository and run it
with ``tftrain train --experiment=/that/folder/user_exp.py[:variant]``.
``write_data(folder)`` makes its data: TFRecord shards, a CSV file and an
``.npz`` file, all from one NumPy generator.

Variants: ``conv`` (default: a residual convnet over TFRecords), ``text``
(a Transformer encoder over token ids in TFRecords), ``regression`` (MSE
and MAE, from CSV), ``multilabel`` (sigmoid heads, binary cross-entropy and
a custom metric, from .npz), ``two_inputs`` (a dict of two inputs), ``broken_*``
(mistakes a user makes).
"""

import os

import keras
import numpy as np
import tensorflow as tf

import tftrain

IMAGE = (12, 12, 1)
CLASSES = 4
TOKENS, VOCAB, LENGTH = 50, 50, 10


# -- the data ------------------------------------------------------------------


def _images(rng, n):
    labels = rng.integers(0, CLASSES, n)
    images = rng.integers(0, 60, (n, *IMAGE)).astype(np.uint8)
    for i, c in enumerate(labels):  # a bright quadrant says the class
        r, q = divmod(int(c), 2)
        images[i, r * 6 : r * 6 + 6, q * 6 : q * 6 + 6] += 150
    return images, labels


def _tokens(rng, n):
    ids = rng.integers(0, VOCAB, (n, LENGTH))
    labels = (ids % CLASSES == 0).sum(1) % CLASSES  # needs every token
    return ids, labels


def _example(features):
    def feature(value):
        if isinstance(value, bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=list(np.ravel(value))))

    return tf.train.Example(
        features=tf.train.Features(feature={k: feature(v) for k, v in features.items()})
    ).SerializeToString()


def write_data(folder, n_train=768, n_test=256, shards=4):
    rng = np.random.default_rng(7)
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = _images(rng, n)
        ids, token_labels = _tokens(rng, n)
        for s in range(shards):
            path = os.path.join(folder, f"{split}-{s:02d}-of-{shards:02d}.tfrecord")
            with tf.io.TFRecordWriter(path) as w:
                for i in range(s, n, shards):
                    w.write(
                        _example(
                            {
                                "image": images[i].tobytes(),
                                "label": int(labels[i]),
                                "tokens": ids[i],
                                "token_label": int(token_labels[i]),
                            }
                        )
                    )
        x = rng.normal(size=(n, 6)).astype(np.float32)
        y = x @ np.arange(1, 7, dtype=np.float32) / 6 + 0.05 * rng.normal(size=n)
        with open(os.path.join(folder, f"{split}.csv"), "w") as f:
            f.write(",".join([f"x{j}" for j in range(6)] + ["target"]) + "\n")
            for row, t in zip(x, y):
                f.write(",".join(f"{v:.6f}" for v in [*row, t]) + "\n")
        tags = (x[:, :3] > 0).astype(np.float32)
        np.savez(os.path.join(folder, f"{split}.npz"), x=x, tags=tags)


def _records(config, split):
    return os.path.join(config.data_dir, f"{split}-*.tfrecord")


# -- custom layers ----------------------------------------------------------------


class ResidualBlock(keras.layers.Layer):
    """Two convolutions and an identity shortcut, BatchNorm optional."""

    def __init__(self, filters, batchnorm=True, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.batchnorm = filters, batchnorm
        self.conv1 = keras.layers.Conv2D(filters, 3, padding="same", use_bias=not batchnorm)
        self.conv2 = keras.layers.Conv2D(filters, 3, padding="same", use_bias=not batchnorm)
        self.bn1 = keras.layers.BatchNormalization() if batchnorm else None
        self.bn2 = keras.layers.BatchNormalization() if batchnorm else None

    def call(self, x, training=False):
        y = self.conv1(x)
        if self.bn1 is not None:
            y = self.bn1(y, training=training)
        y = self.conv2(keras.ops.relu(y))
        if self.bn2 is not None:
            y = self.bn2(y, training=training)
        return keras.ops.relu(x + y)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "batchnorm": self.batchnorm}


class TokenAndPosition(keras.layers.Layer):
    def __init__(self, vocab, length, width, **kwargs):
        super().__init__(**kwargs)
        self.vocab, self.length, self.width = vocab, length, width
        self.tokens = keras.layers.Embedding(vocab, width)
        self.positions = keras.layers.Embedding(length, width)

    def call(self, ids):
        return self.tokens(ids) + self.positions(keras.ops.arange(self.length))

    def get_config(self):
        return {
            **super().get_config(),
            "vocab": self.vocab,
            "length": self.length,
            "width": self.width,
        }


class EncoderBlock(keras.layers.Layer):
    """Pre-LayerNorm self-attention and an MLP, each with a residual."""

    def __init__(self, width, heads, **kwargs):
        super().__init__(**kwargs)
        self.width, self.heads = width, heads
        self.norm1 = keras.layers.LayerNormalization()
        self.attention = keras.layers.MultiHeadAttention(heads, width // heads)
        self.norm2 = keras.layers.LayerNormalization()
        self.mlp1 = keras.layers.Dense(2 * width, activation="gelu")
        self.mlp2 = keras.layers.Dense(width)

    def call(self, x):
        y = self.norm1(x)
        x = x + self.attention(y, y)
        return x + self.mlp2(self.mlp1(self.norm2(x)))

    def get_config(self):
        return {**super().get_config(), "width": self.width, "heads": self.heads}


class Hamming(keras.metrics.Metric):
    """The share of tags predicted right (a custom metric: sums of its own)."""

    def __init__(self, name="hamming", **kwargs):
        super().__init__(name=name, **kwargs)
        self.right = self.add_variable((), initializer="zeros", name="right")
        self.total = self.add_variable((), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        right = keras.ops.cast(keras.ops.equal(y_true > 0.5, y_pred > 0.5), "float32")
        self.right.assign_add(keras.ops.sum(right))
        self.total.assign_add(keras.ops.cast(keras.ops.size(right), "float32"))

    def result(self):
        return self.right / keras.ops.maximum(self.total, 1.0)


# -- tasks ------------------------------------------------------------------------


class ConvTask(tftrain.Task):
    def build_model(self, config):
        inputs = keras.Input(IMAGE, name="image")
        x = keras.layers.Rescaling(1 / 255)(inputs)
        x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
        x = ResidualBlock(8, batchnorm=config.batchnorm, name="block")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        model = keras.Model(inputs, keras.layers.Dense(CLASSES)(x), name="residual_convnet")
        model.compile(
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        return model

    def build_inputs(self, config, context, training):
        def decode(parsed):
            images = tf.io.decode_raw(parsed["image"], tf.uint8)
            return tf.reshape(images, [-1, *IMAGE]), parsed["label"]

        return tftrain.data.tfrecords(
            _records(config, "train" if training else "test"),
            {
                "image": tf.io.FixedLenFeature([], tf.string),
                "label": tf.io.FixedLenFeature([], tf.int64),
            },
            decode=decode,
            shard=config.shard,
            config=config,
            context=context,
            training=training,
        )


class PlainPipelineTask(ConvTask):
    """The convnet over the user's own tf.data pipeline, no tftrain.data
    helper: each input pipeline reads its own records, through a shuffle
    buffer whose contents are that pipeline's own."""

    def build_inputs(self, config, context, training):
        files = sorted(tf.io.gfile.glob(_records(config, "train" if training else "test")))
        ds = tf.data.TFRecordDataset(files)
        ds = ds.shard(context.num_input_pipelines, context.input_pipeline_id)
        if training:
            ds = ds.shuffle(200, seed=config.seed, reshuffle_each_iteration=False)
        features = {
            "image": tf.io.FixedLenFeature([], tf.string),
            "label": tf.io.FixedLenFeature([], tf.int64),
        }

        def decode(serialized):
            parsed = tf.io.parse_example(serialized, features)
            images = tf.io.decode_raw(parsed["image"], tf.uint8)
            return tf.reshape(images, [-1, *IMAGE]), parsed["label"]

        batch = context.get_per_replica_batch_size(config.batch_size) if training else 64
        return ds.batch(batch, drop_remainder=training).map(decode)


class TextTask(tftrain.Task):
    def build_model(self, config):
        ids = keras.Input((LENGTH,), dtype="int32", name="tokens")
        x = TokenAndPosition(VOCAB, LENGTH, config.width, name="embed")(ids)
        x = EncoderBlock(config.width, config.num_heads, name="encoder")(x)
        x = keras.layers.GlobalAveragePooling1D()(x)
        model = keras.Model(ids, keras.layers.Dense(CLASSES)(x), name="text_encoder")
        model.compile(
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
        )
        return model

    def build_inputs(self, config, context, training):
        features = {
            "tokens": tf.io.FixedLenFeature([LENGTH], tf.int64),
            "token_label": tf.io.FixedLenFeature([], tf.int64),
        }
        return tftrain.data.tfrecords(
            _records(config, "train" if training else "test"),
            features,
            decode=lambda p: (tf.cast(p["tokens"], tf.int32), p["token_label"]),
            shard=config.shard,
            config=config,
            context=context,
            training=training,
        )


class RegressionTask(tftrain.Task):
    def build_model(self, config):
        model = keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)],
            name="regressor",
        )
        model.compile(loss="mse", metrics=["mae"])
        return model

    def build_inputs(self, config, context, training):
        path = os.path.join(config.data_dir, ("train" if training else "test") + ".csv")
        return tftrain.data.csv(
            path, label="target", config=config, context=context, training=training
        )


class MultiLabelTask(tftrain.Task):
    def build_model(self, config):
        inputs = keras.Input((6,), name="x")
        hidden = keras.layers.Dense(16, activation="relu")(inputs)
        return keras.Model(inputs, keras.layers.Dense(3, activation="sigmoid")(hidden))

    def build_inputs(self, config, context, training):
        arrays = np.load(os.path.join(config.data_dir, ("train" if training else "test") + ".npz"))
        return tftrain.data.from_arrays(
            arrays["x"], arrays["tags"], config=config, context=context, training=training
        )

    def build_loss(self, config):
        return keras.losses.BinaryCrossentropy()

    def build_metrics(self, config):
        return [Hamming(), keras.metrics.AUC(name="auc")]


class TwoInputTask(tftrain.Task):
    def build_model(self, config):
        dense = keras.Input((6,), name="measurements")
        ids = keras.Input((2,), dtype="int32", name="category")
        embedded = keras.layers.Flatten()(keras.layers.Embedding(10, 3)(ids))
        joined = keras.layers.Concatenate()([dense, embedded])
        out = keras.layers.Dense(1)(keras.layers.Dense(8, activation="relu")(joined))
        model = keras.Model({"measurements": dense, "category": ids}, out, name="two_inputs")
        model.compile(loss="mse", metrics=["mae"])
        return model

    def build_inputs(self, config, context, training):
        arrays = np.load(os.path.join(config.data_dir, ("train" if training else "test") + ".npz"))
        x = arrays["x"]
        category = (np.abs(x[:, :2]) * 3).astype(np.int32) % 10
        target = x.sum(1, keepdims=True) + category[:, :1] / 10
        return tftrain.data.from_arrays(
            {"measurements": x, "category": category},
            target.astype(np.float32),
            config=config,
            context=context,
            training=training,
        )


# -- the mistakes -------------------------------------------------------------------


class SoftmaxUnderLogits(ConvTask):
    def build_model(self, config):
        model = super().build_model(config)
        head = keras.layers.Softmax()(model.output)
        model = keras.Model(model.input, head)
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model


class NotAModel(ConvTask):
    def build_model(self, config):
        return "a string"


class BadElements(ConvTask):
    def build_inputs(self, config, context, training):
        return tf.data.Dataset.from_tensor_slices(np.zeros((8, 3), np.float32)).batch(4)


class RaisesInBuild(ConvTask):
    def build_model(self, config):
        return self.helper_that_does_not_exist()


class LabelsOutOfRange(ConvTask):
    def build_inputs(self, config, context, training):
        return super().build_inputs(config, context, training).map(lambda x, y: (x, y + 10))


class StringLabels(ConvTask):
    def build_inputs(self, config, context, training):
        ds = super().build_inputs(config, context, training)
        return ds.map(lambda x, y: (x, tf.strings.as_string(y)))


class LateBadLabel(ConvTask):
    """Labels that fit in the first batches and not in the fourth."""

    def build_inputs(self, config, context, training):
        ds = super().build_inputs(config, context, training).enumerate()
        return ds.map(lambda i, xy: (xy[0], tf.where(i == 3, xy[1] + 10, xy[1])))


TASKS = {
    "conv": ConvTask,
    "text": TextTask,
    "regression": RegressionTask,
    "multilabel": MultiLabelTask,
    "two_inputs": TwoInputTask,
    "plain": PlainPipelineTask,
    "broken_softmax": SoftmaxUnderLogits,
    "broken_model": NotAModel,
    "broken_elements": BadElements,
    "broken_raises": RaisesInBuild,
    "broken_labels": LabelsOutOfRange,
    "broken_strings": StringLabels,
    "broken_late_label": LateBadLabel,
}


def get_config(variant=None):
    return tftrain.ExperimentConfig(
        task=TASKS[variant or "conv"],
        data_dir=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"),
        optimizer="adam",
        learning_rate=3e-3,
        batch_size=32,
        epochs=2,
        steps_per_epoch=24,  # 768 examples in batches of 32
        steps_per_loop=8,
        eval_batch_size=64,
        options={"batchnorm": False, "shard": "example", "width": 16, "num_heads": 2},
    )
