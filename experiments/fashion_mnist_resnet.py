"""ResNet-20 (He et al. 2016, the CIFAR family) on Fashion-MNIST.

Three stages of basic blocks (two 3x3 convolutions with BatchNormalization,
an identity shortcut, or a 1x1 projection where the stage halves the image
and doubles the channels), 16, 32 and 64 channels, global average pooling.
The 28x28 images are zero-padded to 32x32 inside the model, so the export
serves the dataset's own uint8 images. Training augments each image with a
random translation of up to 4 pixels (a crop of the image padded by 4) and
a horizontal flip, drawn from the run's seed and the image's place in the
epoch (``tftrain.data``'s ``augment=``): runs stay reproducible and
resumable. SGD with Nesterov momentum 0.9 at 0.1 for a batch of 128, weight decay
5e-4 (decoupled, biases and BatchNorm's scales and offsets left out), one
epoch of warm-up then cosine decay over 30 epochs (15 stopped short of the
0.940 bar: BUILD_NOTES.md).

The benchmark table's ResNet18 (flips, translation, rotation) reached 0.949;
Zhong et al. report ResNet-20 at about 94% without random erasing.

Its BatchNormalization is ``tftrain.layers.FusedBatchNormalization``:
Keras's layer, trained with TensorFlow's fused kernel (its own statistics,
weights and checkpoints; Keras's path under ``--sync_batchnorm``).

Options: ``depth`` (6n+2: 20, 32, 44, ...), ``width`` (the first stage's
channels), ``augment``. Variants: ``smoke`` (ResNet-8 of width 8 on 2,048
images), ``noaugment``.
"""

import keras
import numpy as np

import tftrain
from tftrain.layers import FusedBatchNormalization

# The moving averages' momentum (Keras's default is 0.99): 0.9 follows the
# batch statistics within tens of steps, so a short run evaluates sensibly.
BN_MOMENTUM = 0.9


def residual_block(x, filters: int, stride: int, name: str):
    """Two 3x3 convolutions, each with BatchNormalization, and the shortcut."""
    conv = dict(padding="same", use_bias=False, kernel_initializer="he_normal")
    y = keras.layers.Conv2D(filters, 3, strides=stride, name=f"{name}_conv1", **conv)(x)
    y = FusedBatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn1")(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = keras.layers.Conv2D(filters, 3, name=f"{name}_conv2", **conv)(y)
    y = FusedBatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn2")(y)
    if stride != 1 or x.shape[-1] != filters:
        x = keras.layers.Conv2D(filters, 1, strides=stride, name=f"{name}_proj", **conv)(x)
        x = FusedBatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_proj_bn")(x)
    y = keras.layers.Add(name=f"{name}_add")([x, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def resnet(depth: int, width: int, num_classes: int = 10, seed: int = 0):
    if depth < 8 or (depth - 2) % 6:
        raise tftrain.ConfigError(f"--depth={depth}: a CIFAR ResNet has depth 6n+2 (8, 14, 20...).")
    if width < 1:
        raise tftrain.ConfigError(f"--width={width}: expected at least 1 channel.")
    keras.utils.set_random_seed(seed)
    blocks = (depth - 2) // 6
    images = keras.Input((28, 28, 1), dtype="uint8", name="image")
    # Fashion-MNIST's pixel mean and deviation (0.286, 0.353) on the 0-1 scale.
    x = keras.layers.Rescaling(1 / (255 * 0.353), offset=-0.286 / 0.353, name="normalize")(images)
    x = keras.layers.ZeroPadding2D(2, name="pad_to_32")(x)
    x = keras.layers.Conv2D(
        width, 3, padding="same", use_bias=False, kernel_initializer="he_normal", name="stem"
    )(x)
    x = FusedBatchNormalization(momentum=BN_MOMENTUM, name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    for stage in range(3):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            x = residual_block(x, width * 2**stage, stride, f"stage{stage + 1}_block{block + 1}")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(images, logits, name=f"resnet{depth}")


class ResNetTask(tftrain.Task):
    def __init__(self):
        self._data = None

    def data(self, config):
        if self._data is None:
            self._data = tftrain.data.load("fashion_mnist", config.data_dir)
        return self._data

    def build_model(self, config):
        return resnet(config.depth, config.width, self.data(config).num_classes, config.seed)

    def build_inputs(self, config, context, training):
        split = self.data(config).train if training else self.data(config).test
        return tftrain.data.from_arrays(
            split.images,
            split.labels.astype(np.int64),
            config=config,
            context=context,
            training=training,
            augment=tftrain.data.translate_and_flip(4) if config.augment else None,
        )

    def build_loss(self, config):
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True, name="loss")

    def build_metrics(self, config):
        return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]


def get_config(variant=None):
    config = tftrain.ExperimentConfig(
        experiment="fashion_mnist_resnet",
        task=ResNetTask,
        options={"depth": 20, "width": 16, "augment": True},
        optimizer="momentum",
        momentum=0.9,
        nesterov=True,
        learning_rate=0.1,
        weight_decay=5e-4,
        lr_schedule="cosine",
        warmup_epochs=1,
        batch_size=128,
        eval_batch_size=500,
        epochs=30,
        steps_per_loop=50,
    )
    if variant == "smoke":
        config = config.replace(
            depth=8,
            width=8,
            max_train_examples=2048,
            max_eval_examples=500,
            batch_size=64,
            epochs=2,
            warmup_epochs=0.5,
            steps_per_loop=8,
        )
    elif variant == "noaugment":
        config = config.replace(augment=False)
    elif variant is not None:
        raise tftrain.ConfigError(
            f"fashion_mnist_resnet has variants smoke and noaugment, not {variant!r}."
        )
    return config
