"""Training-step time with tftrain's optimizers against Keras's built-in ones.

Same model, same data, same step function; only the optimizer differs. The
two are timed in alternating rounds in one process, so drift on the machine
hits both alike. Prints a table of milliseconds per step and the ratio
Keras / tftrain (above 1: tftrain is faster). A second table times Adam's
update of one variable alone, by size, as TensorFlow's fused CPU kernel and
as the elementwise ops tftrain uses for mid-sized variables on a CPU.

    .venv/bin/python -m benchmarks.optimizer_step [--rounds=7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tftrain import optimizers  # noqa: E402
from tftrain.optimizers import adam  # noqa: E402

STEPS_PER_CALL = 50


def softmax():
    return keras.Sequential([keras.Input((784,)), keras.layers.Dense(10)])


def mlp():
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def embedding_model():
    # A large table and few rows touched per step: the sparse path's case.
    return keras.Sequential(
        [
            keras.Input((20,), dtype="int32"),
            keras.layers.Embedding(200_000, 64),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(10),
        ]
    )


def batches(kind, rng):
    if kind in ("softmax", "mlp"):
        return (
            tf.constant(rng.uniform(size=(100, 784)).astype("float32")),
            tf.constant(rng.integers(0, 10, 100).astype("int32")),
        )
    return (
        tf.constant(rng.integers(0, 200_000, (256, 20)).astype("int32")),
        tf.constant(rng.integers(0, 10, 256).astype("int32")),
    )


def make_step(model, optimizer, x, y):
    optimizer.build(model.trainable_variables)

    @tf.function
    def run(n):
        for _ in tf.range(n):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(
                        labels=y, logits=model(x, training=True)
                    )
                )
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return run


def race(kind, name, rounds):
    rng = np.random.default_rng(0)
    x, y = batches(kind, rng)
    builders = {
        "adam": (lambda: optimizers.Adam(1e-3), lambda: keras.optimizers.Adam(1e-3)),
        "adagrad": (lambda: optimizers.Adagrad(1e-2), lambda: keras.optimizers.Adagrad(1e-2)),
        "momentum": (
            lambda: optimizers.get("momentum", learning_rate=1e-2),
            lambda: keras.optimizers.SGD(1e-2, momentum=0.9),
        ),
    }[name]
    factory = {"softmax": softmax, "mlp": mlp, "embedding": embedding_model}[kind]
    steps = {}
    for label, build in zip(("tftrain", "keras"), builders):
        keras.utils.set_random_seed(0)
        steps[label] = make_step(factory(), build(), x, y)
        steps[label](tf.constant(2)).numpy()  # trace and warm up
    times = {label: [] for label in steps}
    for _ in range(rounds):
        for label, step in steps.items():
            start = time.perf_counter()
            step(tf.constant(STEPS_PER_CALL)).numpy()
            times[label].append((time.perf_counter() - start) / STEPS_PER_CALL * 1e3)
    ours, theirs = statistics.median(times["tftrain"]), statistics.median(times["keras"])
    return ours, theirs


ADAM_SIZES = (256, 1024, 7840, 16384, 32768, 100_000)
UPDATES_PER_CALL = 500


def _updates(opt, var, g):
    @tf.function
    def run(n):
        for _ in tf.range(n):
            opt.apply_gradients([(g, var)])

    return run


def adam_update(size, rounds):
    """Microseconds per update of one variable of ``size`` elements by
    tftrain's Adam: (fused kernel, elementwise ops), alternated."""
    steps = {}
    for label, elementwise in (("fused", False), ("elementwise", True)):
        var, opt = keras.Variable(np.zeros(size, np.float32)), optimizers.Adam(1e-3)
        opt.build([var])
        g = tf.constant(np.random.default_rng(0).normal(size=size).astype(np.float32))

        original = adam._elementwise_on_cpu
        adam._elementwise_on_cpu = lambda var, answer=elementwise: answer  # read when traced
        try:
            steps[label] = _updates(opt, var, g).get_concrete_function(tf.constant(2))
        finally:
            adam._elementwise_on_cpu = original
        steps[label](tf.constant(2))
    times = {label: [] for label in steps}
    for _ in range(rounds):
        for label, step in steps.items():
            start = time.perf_counter()
            step(tf.constant(UPDATES_PER_CALL))
            times[label].append((time.perf_counter() - start) / UPDATES_PER_CALL * 1e6)
    return statistics.median(times["fused"]), statistics.median(times["elementwise"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--intra_op_threads", type=int, default=0, help="threads inside one op (0: all cores)"
    )
    parser.add_argument("--adam_only", action="store_true", help="only the table of Adam's sizes")
    args = parser.parse_args()
    if args.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_threads)
    threads = args.intra_op_threads or "all"
    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPU "
        f"cores, intra-op threads: {threads}; median of {args.rounds} rounds"
    )
    if not args.adam_only:
        steps_race(args.rounds)
    adam_sizes(args.rounds)


def steps_race(rounds):
    print(f"\nA training step, {STEPS_PER_CALL} a round")
    print(f"{'model':<22}{'optimizer':<11}{'tftrain ms':>11}{'keras ms':>10}{'keras/tftrain':>15}")
    for kind, label in (
        ("softmax", "Softmax 784-10"),
        ("mlp", "MLP 784-256-128-10"),
        ("embedding", "Embedding 200k x 64"),
    ):
        for name in ("adam",) if kind == "softmax" else ("adam", "adagrad", "momentum"):
            ours, theirs = race(kind, name, rounds)
            print(
                f"{label:<22}{name:<11}{ours:>11.3f}{theirs:>10.3f}{theirs / ours:>14.2f}x",
                flush=True,
            )


def adam_sizes(rounds):
    sizes = adam._ELEMENTWISE_SIZES
    print("\nAdam's update of one variable alone (us; tftrain uses elementwise ops on a CPU")
    print(
        f"for {sizes.start:,} to {sizes.stop - 1:,} elements where ops run on more than one "
        f"thread), {UPDATES_PER_CALL} a round"
    )
    print(f"{'elements':>10}{'fused us':>10}{'elementwise us':>16}{'fused/elementwise':>19}")
    for size in ADAM_SIZES:
        fused, elementwise = adam_update(size, rounds)
        ratio = fused / elementwise
        print(f"{size:>10,}{fused:>10.1f}{elementwise:>16.1f}{ratio:>18.2f}x", flush=True)


if __name__ == "__main__":
    main()
