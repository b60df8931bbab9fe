"""Keras 3 model builders. Every model takes raw pixel values in [0, 255]
(float32, shape ``(batch, H, W, C)``) and returns class logits, so the
exported SavedModel serves the same inputs the dataset holds.
"""

from __future__ import annotations

from collections.abc import Sequence


def build_model(
    name: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    seed: int,
    hidden_units: Sequence[int] = (256, 128),
):
    """Builds a model by name.

    Args:
      name: ``softmax``, ``mlp`` or ``cnn``.
      input_shape: one image's shape, ``(H, W, C)``.
      num_classes: the number of logits.
      seed: seeds every initializer, so a seed gives the same weights.
      hidden_units: widths of the mlp's hidden layers.

    Returns:
      A built ``keras.Model``.

    Raises:
      ValueError: for an unknown name.
    """
    import keras
    from keras import layers

    seeds = iter(range(seed * 1000, seed * 1000 + 1000))

    def init():
        return keras.initializers.GlorotUniform(seed=next(seeds))

    inputs = keras.Input(tuple(input_shape), name="images")
    x = layers.Rescaling(1.0 / 255.0)(inputs)
    if name == "softmax":
        # The seed's softmax regression: y = softmax(xW + b), W and b zero.
        x = layers.Flatten()(x)
        logits = layers.Dense(num_classes, kernel_initializer="zeros", name="logits")(x)
    elif name == "mlp":
        x = layers.Flatten()(x)
        for i, units in enumerate(hidden_units):
            x = layers.Dense(
                units, activation="relu", kernel_initializer=init(), name=f"hidden_{i}"
            )(x)
        logits = layers.Dense(num_classes, kernel_initializer=init(), name="logits")(x)
    elif name == "cnn":
        # Two conv+pool blocks and a dense head, as in TensorFlow's layers
        # tutorial (0.916 in the Fashion-MNIST benchmark table).
        for i, filters in enumerate((32, 64)):
            x = layers.Conv2D(
                filters,
                5,
                padding="same",
                activation="relu",
                kernel_initializer=init(),
                name=f"conv_{i}",
            )(x)
            x = layers.MaxPooling2D(2, name=f"pool_{i}")(x)
        x = layers.Flatten()(x)
        x = layers.Dense(512, activation="relu", kernel_initializer=init(), name="dense")(x)
        x = layers.Dropout(0.4, seed=next(seeds), name="dropout")(x)
        logits = layers.Dense(num_classes, kernel_initializer=init(), name="logits")(x)
    else:
        raise ValueError(f"model={name!r}: expected softmax, mlp or cnn.")
    return keras.Model(inputs, logits, name=name)
