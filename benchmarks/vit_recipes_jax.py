"""The ViT recipe search of BUILD_NOTES (issue 23): the fashion_mnist_vit model
rebuilt in Keras 3 on JAX (no tftrain), one recipe per process:
  KERAS_BACKEND=jax python benchmarks/vit_recipes_jax.py NAME '{"ls": 0.1}'
appends per-epoch test accuracy to $RESULTS. Needs jax and keras."""

import gzip
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")
import keras  # noqa: E402 (after the backend is chosen)

DATA = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
RESULTS = os.environ.get("RESULTS", "/tmp/results.txt")


def idx(name):
    with gzip.open(os.path.join(DATA, name)) as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


class Position(keras.layers.Layer):
    def build(self, shape):
        self.embedding = self.add_weight(
            name="embedding",
            shape=tuple(shape[1:]),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02),
        )

    def call(self, x):
        return x + self.embedding


def vit(c):
    dim, heads, patch, drop = c["dim"], c["heads"], c["patch"], c["drop"]
    keras.utils.set_random_seed(c["seed"])
    images = keras.Input((28, 28, 1))
    x = keras.layers.Rescaling(1 / (255 * 0.353), offset=-0.286 / 0.353)(images)
    x = keras.layers.Conv2D(dim, patch, strides=patch)(x)
    x = keras.layers.Reshape(((28 // patch) ** 2, dim))(x)
    x = Position()(x)
    for _ in range(c["depth"]):
        y = keras.layers.LayerNormalization(epsilon=1e-6)(x)
        y = keras.layers.MultiHeadAttention(heads, dim // heads, dropout=c["attn_drop"])(y, y)
        if drop:
            y = keras.layers.Dropout(drop)(y)
        x = keras.layers.Add()([x, y])
        y = keras.layers.LayerNormalization(epsilon=1e-6)(x)
        y = keras.layers.Dense(c["mlp"] * dim, activation="gelu")(y)
        if drop:
            y = keras.layers.Dropout(drop)(y)
        y = keras.layers.Dense(dim)(y)
        if drop:
            y = keras.layers.Dropout(drop)(y)
        x = keras.layers.Add()([x, y])
    x = keras.layers.LayerNormalization(epsilon=1e-6)(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(images, keras.layers.Dense(10)(x))


def augment(x, rng, shift):
    n = len(x)
    flip = rng.random(n) < 0.5
    x = np.where(flip[:, None, None], x[:, :, ::-1], x)
    if shift:
        p = np.pad(x, ((0, 0), (shift, shift), (shift, shift)))
        dy = rng.integers(0, 2 * shift + 1, n)
        dx = rng.integers(0, 2 * shift + 1, n)
        rows = dy[:, None] + np.arange(28)[None]
        cols = dx[:, None] + np.arange(28)[None]
        x = p[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return x


BASE = dict(
    dim=64,
    depth=6,
    heads=4,
    patch=4,
    mlp=2,
    drop=0.0,
    attn_drop=0.0,
    ls=0.0,
    wd=0.05,
    lr=1e-3,
    epochs=20,
    warmup=2,
    shift=0,
    seed=0,
    batch=128,
    clip=1.0,
)


def main(name, overrides):
    c = dict(BASE, **overrides)
    xtr, ytr = idx("train-images-idx3-ubyte.gz"), idx("train-labels-idx1-ubyte.gz")
    xte, yte = idx("t10k-images-idx3-ubyte.gz"), idx("t10k-labels-idx1-ubyte.gz")
    if os.environ.get("SMOKE"):
        xtr, ytr, xte, yte = xtr[:1024], ytr[:1024], xte[:512], yte[:512]
    model = vit(c)
    steps = len(xtr) // c["batch"]
    warm = int(c["warmup"] * steps)
    sched = keras.optimizers.schedules.CosineDecay(
        0.0, c["epochs"] * steps - warm, warmup_target=c["lr"], warmup_steps=warm
    )
    opt = keras.optimizers.AdamW(sched, weight_decay=c["wd"], global_clipnorm=c["clip"])
    opt.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "embedding"])
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=c["ls"])
    model.compile(
        opt, loss, metrics=["accuracy"], steps_per_execution=int(os.environ.get("SPE", "1"))
    )
    rng = np.random.default_rng(c["seed"])
    yte1 = np.eye(10, dtype="float32")[yte]
    t0 = time.time()
    best = 0
    for e in range(c["epochs"]):
        perm = rng.permutation(len(xtr))[: steps * c["batch"]]
        xa = augment(xtr[perm], rng, c["shift"])[..., None].astype("float32")
        h = model.fit(
            xa,
            np.eye(10, dtype="float32")[ytr[perm]],
            batch_size=c["batch"],
            epochs=e + 1,
            initial_epoch=e,
            shuffle=False,
            verbose=0,
        )
        tl, ta = model.evaluate(xte[..., None].astype("float32"), yte1, batch_size=1000, verbose=0)
        best = max(best, ta)
        line = dict(
            name=name,
            epoch=e + 1,
            test=round(float(ta), 4),
            test_loss=round(float(tl), 4),
            train=round(float(h.history["accuracy"][-1]), 4),
            secs=round(time.time() - t0, 1),
        )
        with open(RESULTS, "a") as f:
            f.write(json.dumps(line) + "\n")
    with open(RESULTS, "a") as f:
        f.write(
            json.dumps(
                dict(
                    name=name,
                    final=round(float(ta), 4),
                    best=round(float(best), 4),
                    config=c,
                    secs=round(time.time() - t0, 1),
                )
            )
            + "\n"
        )


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
