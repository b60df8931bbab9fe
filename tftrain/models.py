"""Keras 3 model builders, registered by name in :data:`tftrain.plugins.MODELS`.

Image models take raw pixel values in [0, 255], shape ``(batch, H, W, C)``:
uint8 as the training stream hands them over, or float32 (what the exported
SavedModel serves), and return class logits. ``embedding_bag`` takes integer
token ids ``(batch, length)``. A builder is a function of keyword
arguments: ``input_shape``, ``num_classes``, ``seed`` (seeds every
initializer) and the model's own options; it returns a built ``keras.Model``.
Its ``inputs`` attribute (set with ``@takes``) says which kind of data it
takes: ``"images"`` or ``"tokens"``.
"""

from __future__ import annotations

from collections.abc import Sequence

from tftrain import plugins
from tftrain.errors import ConfigError


def build_model(name: str, **kwargs):
    """Builds the model registered as ``name``.

    Raises:
      ValueError: for an unknown name.
    """
    if name not in plugins.MODELS:
        raise ValueError(f"model={name!r}: expected one of {', '.join(plugins.MODELS.names())}.")
    return plugins.MODELS.get(name)(**kwargs)


def takes(kind: str):
    """Marks a builder as taking ``kind`` of data: ``images`` or ``tokens``."""

    def mark(builder):
        builder.inputs = kind
        return builder

    return mark


def _kind_taken(name: str) -> str:
    return getattr(plugins.MODELS.get(name), "inputs", "images")


def check_fits(name: str, dataset) -> None:
    """Raises ConfigError unless model ``name`` takes the kind of data ``dataset`` holds."""
    has = "tokens" if dataset.vocab_size else "images"
    if _kind_taken(name) != has:
        fitting = [m for m in plugins.MODELS.names() if _kind_taken(m) == has]
        raise ConfigError(
            f"--model={name} takes {_kind_taken(name)}, but --dataset={dataset.name} holds "
            f"{has}: expected one of {', '.join(fitting)}."
        )


def parameter_count(name: str, *, input_shape, num_classes: int, **options) -> int | None:
    """The number of parameters model ``name`` will have, without building it
    (None for a model this function does not know: a user's own)."""
    features = 1
    for d in input_shape:
        features *= int(d)
    if name == "softmax":
        return features * num_classes + num_classes
    if name == "mlp":
        widths = [features, *options.get("hidden_units", (256, 128)), num_classes]
        return sum(a * b + b for a, b in zip(widths, widths[1:]))
    if name == "embedding_bag":
        dim = options.get("embedding_dim", 32)
        return (options.get("vocab_size") or 0) * dim + dim * num_classes + num_classes
    return None


def check_memory(name: str, optimizer_slots: int, available_bytes: int | None, **shape) -> None:
    """Raises ConfigError when the model's weights, gradients and optimizer
    slots (float32) would not fit in ``available_bytes``."""
    count = parameter_count(name, **shape)
    if count is None or available_bytes is None:
        return
    needed = 4 * count * (2 + optimizer_slots)
    if needed > available_bytes:
        raise ConfigError(
            f"--model={name} would have {count:,} parameters: with their gradients and "
            f"the optimizer's slots that is {needed / 2**30:,.1f} GiB, more than the "
            f"{available_bytes / 2**30:,.1f} GiB of memory available: expected a smaller model."
        )


def _initializers(seed: int):
    import keras

    seeds = iter(range(seed * 1000, seed * 1000 + 1000))
    return lambda: keras.initializers.GlorotUniform(seed=next(seeds)), seeds


def _image_input(input_shape):
    import keras

    inputs = keras.Input(tuple(input_shape), name="images")
    return inputs, keras.layers.Rescaling(1.0 / 255.0)(inputs)


@takes("images")
def softmax(*, input_shape: Sequence[int], num_classes: int, seed: int, **_):
    """The seed's softmax regression: y = softmax(xW + b), W and b zero."""
    import keras

    inputs, x = _image_input(input_shape)
    x = keras.layers.Flatten()(x)
    logits = keras.layers.Dense(num_classes, kernel_initializer="zeros", name="logits")(x)
    return keras.Model(inputs, logits, name="softmax")


@takes("images")
def mlp(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    seed: int,
    hidden_units: Sequence[int] = (256, 128),
    **_,
):
    """ReLU layers of ``hidden_units`` widths, then the logits."""
    import keras

    init, _ = _initializers(seed)
    inputs, x = _image_input(input_shape)
    x = keras.layers.Flatten()(x)
    for i, units in enumerate(hidden_units):
        x = keras.layers.Dense(
            units, activation="relu", kernel_initializer=init(), name=f"hidden_{i}"
        )(x)
    logits = keras.layers.Dense(num_classes, kernel_initializer=init(), name="logits")(x)
    return keras.Model(inputs, logits, name="mlp")


@takes("images")
def cnn(*, input_shape: Sequence[int], num_classes: int, seed: int, **_):
    """Two conv+pool blocks and a dense head, as in TensorFlow's layers
    tutorial (0.916 in the Fashion-MNIST benchmark table)."""
    import keras

    init, seeds = _initializers(seed)
    inputs, x = _image_input(input_shape)
    for i, filters in enumerate((32, 64)):
        x = keras.layers.Conv2D(
            filters,
            5,
            padding="same",
            activation="relu",
            kernel_initializer=init(),
            name=f"conv_{i}",
        )(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool_{i}")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(512, activation="relu", kernel_initializer=init(), name="dense")(x)
    x = keras.layers.Dropout(0.4, seed=next(seeds), name="dropout")(x)
    logits = keras.layers.Dense(num_classes, kernel_initializer=init(), name="logits")(x)
    return keras.Model(inputs, logits, name="cnn")


def shard_rows(rows: int, num_shards: int) -> list[int]:
    """Rows per shard as TensorFlow's "div" lookup expects them: the first
    ``rows % num_shards`` shards hold one row more than the others."""
    base, extra = divmod(rows, num_shards)
    return [base + (1 if i < extra else 0) for i in range(num_shards)]


def sharded_embedding_class():
    """``ShardedEmbedding``: an embedding table kept as ``num_shards`` variables
    of consecutive rows, so that a parameter-server strategy places them on
    different parameter servers (one variable each, round-robin).

    Its values are those of ``keras.layers.Embedding`` with the same
    initializer (the full table is drawn, then cut), and a lookup gathers each
    id from its shard: the gradient of each shard is sparse (only the rows
    looked up) and the optimizers update each shard where it lives.
    """
    import keras
    import tensorflow as tf

    class ShardedEmbedding(keras.layers.Layer):
        def __init__(self, input_dim, output_dim, num_shards, embeddings_initializer, **kwargs):
            super().__init__(**kwargs)
            self.input_dim, self.output_dim = int(input_dim), int(output_dim)
            self.num_shards = int(num_shards)
            self.embeddings_initializer = keras.initializers.get(embeddings_initializer)

        def build(self, input_shape):
            table = self.embeddings_initializer((self.input_dim, self.output_dim))
            start, self.shards = 0, []
            for i, rows in enumerate(shard_rows(self.input_dim, self.num_shards)):
                part = table[start : start + rows]
                self.shards.append(
                    self.add_weight(
                        shape=(rows, self.output_dim),
                        initializer=lambda shape, dtype=None, part=part: part,
                        name=f"embeddings_{i}",
                    )
                )
                start += rows

        def call(self, ids):
            return tf.nn.embedding_lookup([shard.value for shard in self.shards], ids)

        def compute_output_shape(self, input_shape):
            return (*input_shape, self.output_dim)

        def get_config(self):
            return {
                **super().get_config(),
                "input_dim": self.input_dim,
                "output_dim": self.output_dim,
                "num_shards": self.num_shards,
                "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
            }

    return ShardedEmbedding


@takes("tokens")
def embedding_bag(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    seed: int,
    vocab_size: int | None = None,
    embedding_dim: int = 32,
    embedding_shards: int = 1,
    **_,
):
    """Token ids -> an embedding table -> the mean of the rows -> logits.

    The table's gradient is sparse (``tf.IndexedSlices``): only the rows a
    batch looks up are updated. ``embedding_shards > 1`` keeps the table as
    that many variables (``ShardedEmbedding``), which parameter servers
    share out.
    """
    import keras

    if not vocab_size:
        raise ValueError("embedding_bag needs a dataset of token ids (a vocabulary size).")
    if not 1 <= embedding_shards <= vocab_size:
        raise ConfigError(
            f"--embedding_shards={embedding_shards}: expected 1 to the vocabulary "
            f"size, {vocab_size}."
        )
    init, _ = _initializers(seed)
    inputs = keras.Input(tuple(input_shape), dtype="int32", name="tokens")
    table_init = keras.initializers.RandomUniform(-0.05, 0.05, seed=seed)
    if embedding_shards > 1:
        layer = sharded_embedding_class()(
            vocab_size, embedding_dim, embedding_shards, table_init, name="embedding"
        )
    else:
        layer = keras.layers.Embedding(
            vocab_size, embedding_dim, embeddings_initializer=table_init, name="embedding"
        )
    x = layer(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    logits = keras.layers.Dense(num_classes, kernel_initializer=init(), name="logits")(x)
    return keras.Model(inputs, logits, name="embedding_bag")
