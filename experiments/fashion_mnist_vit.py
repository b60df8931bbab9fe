"""A Vision Transformer (Dosovitskiy et al. 2021) on Fashion-MNIST.

The 28x28 image is cut into 49 patches of 4x4; each, with the same patch
of four copies of the image shifted diagonally by 2 pixels (shifted patch
tokenization), is normalized and projected to 64 values, with a learned
position embedding added; six pre-LayerNorm blocks
of 4-head self-attention and a GELU MLP (twice as wide), then a LayerNorm,
the mean over the patches and the class logits. No BatchNormalization and
no dropout: a step depends on its batch alone, so the pipeline of stages
(``model_parallel``) equals one device at the same micro-batches. Training
augments with a random horizontal flip (``tftrain.data.translate_and_flip``;
``--shift=N`` adds a random translation of up to N pixels, which this model
learned more slowly from: BUILD_NOTES.md). AdamW: Adam with decoupled weight
decay 0.05 (biases, LayerNorm's scales and offsets and the position
embedding left out), gradients clipped to a global norm of 1, two epochs of
warm-up, then cosine decay; the loss is the cross-entropy against labels
smoothed by 0.1. The shifted patches and the smoothing took the test
accuracy from 0.890 to 0.902 (BUILD_NOTES.md); ``--nospt
--label_smoothing=0`` is the plain ViT.

Options: ``dim``, ``depth``, ``heads``, ``patch``, ``augment``, ``shift``
(the translation's largest shift in pixels; 0 flips only), ``spt``
(shifted patch tokenization, Lee et al. 2021; the shift is half a patch,
rounded down) and ``label_smoothing``. Variant:
``smoke`` (two blocks of 32 values on 2,048 images).
"""

import keras
import numpy as np

import tftrain


@keras.saving.register_keras_serializable(package="fashion_mnist_vit")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned vector to each position of a (batch, positions, dim) input."""

    def build(self, input_shape):
        self.embedding = self.add_weight(
            name="embedding",
            shape=tuple(input_shape[1:]),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02),
        )

    def call(self, x):
        return x + keras.ops.cast(self.embedding, x.dtype)


@keras.saving.register_keras_serializable(package="fashion_mnist_vit")
class ShiftedPatches(keras.layers.Layer):
    """The image's patches as flat vectors, each with the same patch of four
    copies of the image shifted diagonally by half a patch, rounded down
    (shifted patch tokenization, Lee et al. 2021): every token also sees its
    neighbours' pixels, the locality a ViT lacks on a small dataset. Runs on
    the raw pixels, so the shifts bring in black (0), the images' background."""

    def __init__(self, patch, **kwargs):
        super().__init__(**kwargs)
        self.patch = patch

    def call(self, x):
        ops = keras.ops
        size, s, p = x.shape[1], self.patch // 2, self.patch
        padded = ops.pad(x, [[0, 0], [s, s], [s, s], [0, 0]])
        shifts = [(0, 0), (-s, -s), (-s, s), (s, -s), (s, s)]
        x = ops.concatenate(
            [padded[:, s + dy : s + dy + size, s + dx : s + dx + size, :] for dy, dx in shifts],
            axis=-1,
        )
        n, channels = size // p, x.shape[-1]
        x = ops.reshape(x, (-1, n, p, n, p, channels))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
        return ops.reshape(x, (-1, n * n, p * p * channels))

    def get_config(self):
        return {**super().get_config(), "patch": self.patch}


@keras.saving.register_keras_serializable(package="fashion_mnist_vit")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy of integer labels against targets smoothed by
    ``smoothing``: ``1 - smoothing`` on the label, the rest shared by all
    classes (Szegedy et al. 2016). Its name says "sparse" and
    "crossentropy" so that tftrain checks the labels and logits against it
    as it does Keras's own."""

    def __init__(self, num_classes, smoothing, from_logits=True, name="loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes, self.smoothing, self.from_logits = num_classes, smoothing, from_logits

    def call(self, y_true, y_pred):
        labels = keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32")
        targets = keras.ops.one_hot(labels, self.num_classes, dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(
            targets, y_pred, from_logits=self.from_logits, label_smoothing=self.smoothing
        )

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "smoothing": self.smoothing,
            "from_logits": self.from_logits,
        }


def encoder_block(x, heads: int, name: str):
    """Pre-LayerNorm: x + attention(norm(x)), then x + mlp(norm(x))."""
    dim = x.shape[-1]
    y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{name}_norm1")(x)
    y = keras.layers.MultiHeadAttention(heads, dim // heads, name=f"{name}_attention")(y, y)
    x = keras.layers.Add(name=f"{name}_add1")([x, y])
    y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{name}_norm2")(x)
    y = keras.layers.Dense(2 * dim, activation="gelu", name=f"{name}_mlp1")(y)
    y = keras.layers.Dense(dim, name=f"{name}_mlp2")(y)
    return keras.layers.Add(name=f"{name}_add2")([x, y])


def vit(
    dim: int,
    depth: int,
    heads: int,
    patch: int,
    num_classes: int = 10,
    seed: int = 0,
    spt: bool = False,
):
    if min(dim, depth, heads, patch) < 1 or 28 % patch or dim % heads:
        raise tftrain.ConfigError(
            f"--patch={patch}, --dim={dim}, --depth={depth}, --heads={heads}: each at least 1, "
            "the patch must divide 28 and the heads must divide dim."
        )
    keras.utils.set_random_seed(seed)
    images = keras.Input((28, 28, 1), dtype="uint8", name="image")
    normalize = keras.layers.Rescaling(1 / (255 * 0.353), offset=-0.286 / 0.353, name="normalize")
    if spt:
        x = normalize(ShiftedPatches(patch, name="shifted_patches")(images))
        x = keras.layers.LayerNormalization(epsilon=1e-6, name="patch_norm")(x)
        x = keras.layers.Dense(dim, name="tokens")(x)
    else:
        x = keras.layers.Conv2D(dim, patch, strides=patch, name="patches")(normalize(images))
        x = keras.layers.Reshape(((28 // patch) ** 2, dim), name="tokens")(x)
    x = PositionEmbedding(name="position")(x)
    for i in range(depth):
        x = encoder_block(x, heads, f"block{i + 1}")
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="final_norm")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(images, logits, name="vit")


class ViTTask(tftrain.Task):
    def __init__(self):
        self._data = None

    def data(self, config):
        if self._data is None:
            self._data = tftrain.data.load("fashion_mnist", config.data_dir)
        return self._data

    def build_model(self, config):
        if config.shift < 0:
            raise tftrain.ConfigError(
                f"--shift={config.shift}: the largest shift is 0 pixels or more."
            )
        num_classes = self.data(config).num_classes
        return vit(
            config.dim,
            config.depth,
            config.heads,
            config.patch,
            num_classes,
            config.seed,
            config.spt,
        )

    def build_inputs(self, config, context, training):
        split = self.data(config).train if training else self.data(config).test
        return tftrain.data.from_arrays(
            split.images,
            split.labels.astype(np.int64),
            config=config,
            context=context,
            training=training,
            augment=tftrain.data.translate_and_flip(config.shift) if config.augment else None,
        )

    def build_loss(self, config):
        if not 0 <= config.label_smoothing < 1:
            raise tftrain.ConfigError(
                f"--label_smoothing={config.label_smoothing}: from 0 up to, not including, 1."
            )
        if config.label_smoothing:
            return SmoothedSparseCrossentropy(self.data(config).num_classes, config.label_smoothing)
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True, name="loss")

    def build_metrics(self, config):
        return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]


def get_config(variant=None):
    config = tftrain.ExperimentConfig(
        experiment="fashion_mnist_vit",
        task=ViTTask,
        options={
            "dim": 64,
            "depth": 6,
            "heads": 4,
            "patch": 4,
            "augment": True,
            "shift": 0,
            "spt": True,
            "label_smoothing": 0.1,
        },
        optimizer="adam",
        learning_rate=1e-3,
        weight_decay=0.05,
        weight_decay_exclude=("position",),
        clip_norm=1.0,
        lr_schedule="cosine",
        warmup_epochs=2,
        batch_size=128,
        eval_batch_size=500,
        epochs=20,
        steps_per_loop=50,
    )
    if variant == "smoke":
        config = config.replace(
            dim=32,
            depth=2,
            heads=2,
            max_train_examples=2048,
            max_eval_examples=500,
            batch_size=64,
            epochs=2,
            warmup_epochs=0.5,
            steps_per_loop=8,
        )
    elif variant is not None:
        raise tftrain.ConfigError(f"fashion_mnist_vit has the variant smoke, not {variant!r}.")
    return config
