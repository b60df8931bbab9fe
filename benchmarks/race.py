"""tftrain against Keras ``model.fit`` and against the hardware, in one run.

Three sections (``--sections``), each a table:

speed
  For each case (the same model, data, optimizer and batch) it measures,
  each in its own process and in rotated order, ``--rounds`` times:

    tftrain         ``tftrain train`` as a user runs it: its steady examples/s
                    from metrics.json (the first loop, which traces, left out)
    fit             Keras 3 ``model.fit`` with its defaults (Keras's Adam, the
                    same loss and accuracy metric), timed from its second epoch
    fit best        the same with ``steps_per_execution=100`` and ``jit_compile``
    products alone  the step's matrix products and convolutions timed alone
                    (forward, weight gradient, input gradient; random operands
                    of the step's shapes): what the arithmetic alone allows
    peak            this machine's matrix-multiply peak (in ``--precision``): a
                    chain of 2048x2048 matmuls in one ``tf.function``
    input           tftrain's training stream alone (batch 100), pulled in a
                    ``tf.function`` as the loop pulls it

  and prints the medians (with the spread over the rounds) of examples/s,
  milliseconds per step, peak resident memory, the ratios tftrain/fit,
  tftrain/fit best and tftrain/products alone, and the fraction of the
  matmul peak that tftrain's step and the products alone reach. A step's
  FLOPs are counted from the model's Dense and Conv2D layers: the forward
  product, the weight gradient and the input gradient (2 multiply-adds per
  weight per example each; no input gradient for the first layer, whose
  input needs none).

distributed
  Every parallel mode on the MLP against ``one_device`` at the same global
  batch (benchmarks/distributed.py), and one all-reduce of its gradients
  between 2 launched workers against the ring bound.

time_to_accuracy
  Seconds from process start to test accuracy 0.91 on the CNN, tftrain
  against ``fit`` (benchmarks/time_to_accuracy.py).

    .venv/bin/python -m benchmarks [--sections=speed,distributed,time_to_accuracy]
        [--cases=softmax,mlp,wide_mlp,cnn,resnet] [--distributed=ROW,...] [--rounds=3]
        [--precision=float32|bfloat16]

Nothing else may run on the machine meanwhile: this machine's speed swings
by a third between single runs, hence the rounds and the medians.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

from benchmarks.common import run, run_measured

# name: (built-in model or experiment, hidden units, global batch, steps of a measured run)
CASES = {
    "softmax": ("softmax", None, 100, 6000),
    "mlp": ("mlp", (256, 128), 100, 3000),
    "wide_mlp": ("mlp", (1024, 1024), 256, 600),
    "cnn": ("cnn", None, 100, 300),
    "resnet": ("fashion_mnist_resnet", None, 128, 120),
}
# An experiment's case runs its own model and optimizer, without augmentation
# (fit has none); fit gets Keras's optimizer of the same kind.
RUNNERS = ("tftrain", "fit", "fit best")
# More runners, on request (--runners): tftrain itself with one setting changed.
VARIANTS = {
    "tftrain bf16": ["--precision=bfloat16"],
    "tftrain no summaries": None,  # train scalars only at the end (--summary_every=steps)
    "tftrain no onednn": (),  # TensorFlow's own CPU kernels (its environment, below)
}
VARIANT_ENV = {"tftrain no onednn": {"TF_ENABLE_ONEDNN_OPTS": "0"}}
LEARNING_RATE = 1e-3


# -- what each child process measures ----------------------------------------


def _experiment(case: str):
    """The case's experiment config (None for a built-in model)."""
    from tftrain import registry

    name = CASES[case][0]
    return registry.get(name).replace(augment=False) if name.startswith("fashion_mnist_") else None


def case_model(case: str):
    """The case's Keras model, as tftrain builds it."""
    from tftrain import models, tasks

    name, hidden, _, _ = CASES[case]
    config = _experiment(case)
    if config is not None:
        return tasks.from_config(config).build_model(config)
    return models.build_model(
        name, input_shape=(28, 28, 1), num_classes=10, seed=0, hidden_units=hidden or ()
    )


def _keras_optimizer(case: str):
    import keras

    config = _experiment(case)
    if config is None:
        return keras.optimizers.Adam(LEARNING_RATE)
    assert config.optimizer == "momentum", config.optimizer
    return keras.optimizers.SGD(
        config.learning_rate,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay or None,
    )


def _keras_child(case: str, best: bool, precision: str) -> dict:
    """Keras 3 model.fit on the case; examples/s from the second epoch on."""
    import keras
    import numpy as np

    from tftrain import data

    _, _, batch, steps = CASES[case]
    if precision == "bfloat16":
        keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    dataset = data.load("fashion_mnist")
    usable = len(dataset.train) // batch * batch
    if _experiment(case) is not None:  # a heavy model: epochs of `steps` steps
        usable = min(usable, steps * batch)
    x = dataset.train.images[:usable]
    # (A built-in model takes float32; an experiment's, the images as stored.)
    x = x if _experiment(case) is not None else x.astype(np.float32)
    y = dataset.train.labels[:usable]
    keras.utils.set_random_seed(0)
    model = case_model(case)
    options = {"steps_per_execution": 100, "jit_compile": True} if best else {}
    model.compile(
        optimizer=_keras_optimizer(case),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        **options,
    )
    per_epoch = usable // batch
    epochs = 1 + math.ceil(steps / per_epoch)
    times = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=True, verbose=0, callbacks=[Clock()])
    seconds = sum(times[1:])  # the first epoch traces and compiles
    return {"examples_per_second": (epochs - 1) * usable / seconds}


def _peak_child(precision: str) -> dict:
    """The best of 5 timings of 20 chained 2048x2048 matmuls."""
    import tensorflow as tf

    n, chain = 2048, 20
    dtype = tf.bfloat16 if precision == "bfloat16" else tf.float32
    a = tf.random.normal([n, n], dtype=tf.float32)
    a = tf.cast(a / math.sqrt(n), dtype)

    @tf.function
    def products(x):
        for _ in range(chain):
            x = tf.matmul(x, a)
        return x

    products(a).numpy()
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        products(a).numpy()
        best = min(best, time.perf_counter() - start)
    return {"flops_per_second": 2 * n**3 * chain / best}


def _bound_child(case: str, precision: str) -> dict:
    """The step's matrix products alone: for each Dense and Conv2D layer of
    the case's model, at its batch, the forward product, the weight gradient
    and (past the first layer) the input gradient, all in one ``tf.function``
    on random operands; the best of 5 timings of 20 calls, as examples/s."""
    import keras
    import tensorflow as tf

    _, _, batch, _ = CASES[case]
    dtype = tf.bfloat16 if precision == "bfloat16" else tf.float32
    model = case_model(case)
    operands, first = [], True
    for layer in model.layers:
        if not isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)):
            continue
        shape = (batch, *layer.input.shape[1:])
        if isinstance(layer, keras.layers.Dense):
            shape = (batch, math.prod(shape[1:]))
        x = tf.cast(tf.random.normal(shape), dtype)
        w = tf.cast(tf.random.normal(layer.kernel.shape), dtype)
        dy = tf.cast(tf.random.normal((batch, *layer.output.shape[1:])), dtype)
        operands.append((layer, x, w, dy, first))
        first = False

    def products():
        total = []
        for layer, x, w, dy, first_layer in operands:
            with tf.GradientTape() as tape:
                tape.watch([x, w])
                if isinstance(layer, keras.layers.Dense):
                    y = tf.matmul(x, w)
                else:
                    y = tf.nn.conv2d(x, w, layer.strides, layer.padding.upper())
            wanted = [w] if first_layer else [x, w]
            total += tape.gradient(y, wanted, output_gradients=dy) + [y]
        return [tf.reduce_sum(t[..., :1]) for t in total]

    # One call a repeat: repeats inside one graph would be merged as common
    # subexpressions of the same operands.
    once = tf.function(products)
    once()
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(20):
            results = once()
        tf.nest.map_structure(lambda t: t.numpy(), results)
        best = min(best, time.perf_counter() - start)
    return {"examples_per_second": 20 * batch / best}


def _input_child(batch: str) -> dict:
    """tftrain's training stream alone, pulled inside one tf.function as the
    training loop pulls it: examples/s."""
    import tensorflow as tf

    from tftrain import data

    batch_size, steps = int(batch), 3000
    split = data.load("fashion_mnist").train
    iterator = iter(data.train_dataset(split, global_batch_size=batch_size, seed=0))

    @tf.function
    def pull(n):
        total = tf.constant(0.0)
        for _ in tf.range(n):
            images, labels = next(iterator)
            total += tf.cast(images[0, 0, 0, 0], tf.float32) + tf.cast(labels[0], tf.float32)
        return total

    pull(tf.constant(100)).numpy()
    start = time.perf_counter()
    pull(tf.constant(steps)).numpy()
    return {"examples_per_second": steps * batch_size / (time.perf_counter() - start)}


# -- the parent ----------------------------------------------------------------


def training_flops_per_example(case: str) -> float:
    """Multiply-adds x 2 of the Dense and Conv2D products of one training example."""
    import keras

    model = case_model(case)
    total, first = 0.0, True
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            forward = 2.0 * layer.kernel.shape[0] * layer.kernel.shape[1]
        elif isinstance(layer, keras.layers.Conv2D):
            _, height, width, out = layer.output.shape
            kh, kw, cin, _ = layer.kernel.shape
            forward = 2.0 * height * width * out * kh * kw * cin
        else:
            continue
        total += forward * (2 if first else 3)
        first = False
    return total


def _measure_tftrain(case: str, precision: str, extra=(), env=None) -> tuple[float, float]:
    name, hidden, batch, steps = CASES[case]
    if name.startswith("fashion_mnist_"):
        model = [f"--experiment={name}", "--augment=false", "--max_eval_examples=1000"]
    else:
        model = [
            "--dataset=fashion_mnist",
            f"--model={name}",
            "--optimizer=adam",
            f"--learning_rate={LEARNING_RATE}",
        ]
    with tempfile.TemporaryDirectory() as model_dir:
        flags = [
            "train",
            *model,
            f"--batch_size={batch}",
            f"--train_steps={steps}",
            f"--steps_per_loop={min(steps // 3, 500)}",
            f"--eval_interval={steps}",
            f"--checkpoint_interval={steps}",
            "--noexport",
            f"--model_dir={model_dir}",
        ]
        if hidden:
            flags.append(f"--hidden_units={','.join(map(str, hidden))}")
        if precision != "float32":
            flags.append(f"--precision={precision}")
        flags += extra if extra is not None else [f"--summary_every={steps}"]
        metrics, rss = run(flags, model_dir, env)
    return metrics["examples_per_second"], rss


def _measure_child(*args: str) -> tuple[dict, float]:
    out, rss = run_measured([sys.executable, "-m", "benchmarks.race", "--child", *args])
    return json.loads(out.strip().splitlines()[-1]), rss


def measure(runner: str, case: str, precision: str) -> tuple[float, float]:
    """(examples/s, peak RSS MiB) of one runner on one case."""
    if runner == "tftrain":
        return _measure_tftrain(case, precision, ())
    if runner in VARIANTS:
        return _measure_tftrain(case, precision, VARIANTS[runner], VARIANT_ENV.get(runner))
    result, rss = _measure_child(runner.replace(" ", "_"), case, precision)
    return result["examples_per_second"], rss


def _spread(values: list[float]) -> str:
    median = statistics.median(values)
    if len(values) < 2 or not median:
        return ""
    return f" ±{(max(values) - min(values)) / 2 / median:.0%}"


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "TensorFlow's default")
    return (
        f"{model}, {len(os.sched_getaffinity(0))} cores usable, {platform.system()}, "
        f"oneDNN: {onednn}"
    )


SECTIONS = ("speed", "distributed", "time_to_accuracy")


def main(argv: list[str] | None = None) -> None:
    from benchmarks import distributed

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=", ".join(SECTIONS))
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument(
        "--runners",
        default=",".join(RUNNERS),
        help=f"tftrain first; of {', '.join(RUNNERS + tuple(VARIANTS))}",
    )
    parser.add_argument(
        "--distributed", default=",".join(distributed.ROWS), help="rows of the distributed section"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind != "fit":
            from tftrain import _internal

            # Keras fit at its best settings, and the hardware's bounds, with
            # the CPU allocator tftrain runs with (Keras's defaults: TensorFlow's).
            _internal.pool_cpu_memory()
        children = {"peak": _peak_child, "input": _input_child, "bound": _bound_child}
        if kind in children:
            print(json.dumps(children[kind](*rest)))
        else:
            print(json.dumps(_keras_child(rest[0], kind == "fit_best", rest[1])))
        return

    from tftrain import quiet

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    quiet.filter_native_stderr()  # this process imports TensorFlow to count FLOPs
    sections = args.sections.split(",")
    cases = args.cases.split(",")
    runners = args.runners.split(",")
    rows = args.distributed.split(",")
    unknown = (
        [s for s in sections if s not in SECTIONS]
        + [c for c in cases if c not in CASES]
        + [r for r in runners if r not in RUNNERS and r not in VARIANTS]
        + [r for r in rows if r not in distributed.ROWS]
    )
    if unknown:
        parser.error(f"unknown section, case, runner or row: {', '.join(unknown)}")
    print(
        f"{machine()}; median of {args.rounds} rounds (± half the range); Adam {LEARNING_RATE} "
        "(an experiment's case: its own optimizer)",
        flush=True,
    )
    if "speed" in sections:
        _speed_section(args, cases, runners)
    if "distributed" in sections:
        _distributed_section(args, rows)
    if "time_to_accuracy" in sections:
        _time_to_accuracy_section(args)


def _speed_section(args, cases: list[str], runners: list[str]) -> None:
    print(f"\n## Speed: tftrain, Keras fit and the hardware (precision {args.precision})\n")
    speeds = {(c, r): [] for c in cases for r in runners}
    memory = {(c, r): [] for c in cases for r in runners}
    bounds = {c: [] for c in cases}
    peaks, inputs = [], []
    for round_index in range(args.rounds):
        peak, _ = _measure_child("peak", args.precision)
        peaks.append(peak["flops_per_second"])
        stream, _ = _measure_child("input", "100")
        inputs.append(stream["examples_per_second"])
        for case in cases:
            bound, _ = _measure_child("bound", case, args.precision)
            bounds[case].append(bound["examples_per_second"])
            shift = round_index % len(runners)
            for runner in runners[shift:] + runners[:shift]:
                speed, rss = measure(runner, case, args.precision)
                speeds[(case, runner)].append(speed)
                memory[(case, runner)].append(rss)
            print(
                f"  round {round_index + 1} {case}: "
                + ", ".join(f"{r} {speeds[(case, r)][-1]:,.0f}" for r in runners)
                + f", products alone {bounds[case][-1]:,.0f}",
                flush=True,
            )
    peak = statistics.median(peaks)
    print(f"\nmatmul peak ({args.precision}): {peak / 1e9:,.0f} GFLOP/s{_spread(peaks)}")
    stream = statistics.median(inputs)
    fastest = (
        max(statistics.median(v) for (_, r), v in speeds.items() if r == "tftrain")
        if "tftrain" in runners
        else None
    )
    print(
        f"input pipeline alone (batch 100): {stream:,.0f} examples/s{_spread(inputs)}"
        + (f", {stream / fastest:.1f}x the fastest tftrain case" if fastest else "")
        + "\n"
    )
    header = "| case | batch | " + " | ".join(f"{r} examples/s" for r in runners)

    def ratio_name(r):
        return f"{r} / tftrain" if r in VARIANTS else f"tftrain / {r}"

    header += " | tftrain ms/step | " + " | ".join(ratio_name(r) for r in runners[1:])
    header += (
        " | products alone examples/s | tftrain / products alone | products alone % of peak"
        " | tftrain % of peak | peak RSS MiB (" + ", ".join(runners) + ") |"
    )
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for case in cases:
        _, _, batch, _ = CASES[case]
        median = {r: statistics.median(speeds[(case, r)]) for r in runners}
        row = [case, str(batch)]
        row += [f"{median[r]:,.0f}{_spread(speeds[(case, r)])}" for r in runners]
        base = median.get("tftrain")
        row.append(f"{1000 * batch / base:.3f}" if base else "-")
        row += [
            (f"{median[r] / base:.2f}x" if r in VARIANTS else f"{base / median[r]:.2f}x")
            if base
            else "-"
            for r in runners[1:]
        ]
        flops = training_flops_per_example(case)
        bound = statistics.median(bounds[case])
        row.append(f"{bound:,.0f}{_spread(bounds[case])}")
        row.append(f"{base / bound:.2f}x" if base else "-")
        row.append(f"{100 * bound * flops / peak:.0f}%")
        row.append(f"{100 * base * flops / peak:.0f}%" if base else "-")
        row.append(", ".join(f"{statistics.median(memory[(case, r)]):,.0f}" for r in runners))
        print("| " + " | ".join(row) + " |")


def _distributed_section(args, rows: list[str]) -> None:
    from benchmarks import distributed

    print(
        "\n## Distributed: MLP 256-128 (resnet rows: ResNet-20), each row against one_device "
        "at its global batch\n"
    )
    needed = list(dict.fromkeys([distributed.baseline(r) for r in rows] + rows))
    speeds = {r: [] for r in needed}
    reduces, alones, bounds = [], [], []
    for round_index in range(args.rounds):
        shift = round_index % len(needed)
        for row in needed[shift:] + needed[:shift]:
            speeds[row].append(distributed.measure(row)[0])
        seconds, alone, bound = distributed.allreduce_against_bound()
        reduces.append(seconds)
        alones.append(alone)
        bounds.append(bound)
        print(
            f"  round {round_index + 1}: "
            + ", ".join(f"{r} {speeds[r][-1]:,.0f}" for r in needed)
            + f"; all-reduce {seconds * 1e6:,.0f} us, ring alone {alone * 1e6:,.0f} us, "
            f"bound {bound * 1e6:,.0f} us",
            flush=True,
        )
    print("\n| run | global batch | examples/s | updates/s | vs one_device |")
    print("| --- | --- | --- | --- | --- |")
    for row in needed:
        batch = distributed.ROWS[row][0]
        median = statistics.median(speeds[row])
        base = statistics.median(speeds[distributed.baseline(row)])
        print(
            f"| {row} | {batch} | {median:,.0f}{_spread(speeds[row])} | "
            f"{median / batch:,.0f} | {median / base:.2f}x |"
        )
    print(
        f"\nOne all-reduce of the MLP's gradients (940,584 bytes) between 2 launched "
        f"workers with tftrain's TCP ring: {statistics.median(reduces) * 1e6:,.0f} us"
        f"{_spread(reduces)} in the training graph, "
        f"{statistics.median(alones) * 1e6:,.0f} us{_spread(alones)} for the ring alone; "
        f"the ring bound at the loopback bandwidth measured is "
        f"{statistics.median(bounds) * 1e6:,.0f} us{_spread(bounds)}: "
        f"{statistics.median([s / b for s, b in zip(reduces, bounds)]):.2f}x and "
        f"{statistics.median([a / b for a, b in zip(alones, bounds)]):.2f}x."
    )


def _time_to_accuracy_section(args) -> None:
    from benchmarks import time_to_accuracy as tta

    print(
        f"\n## Time to test accuracy {tta.TARGET} (fashion_mnist_cnn's model and optimizer; "
        "seconds from process start)\n"
    )
    results = {r: [] for r in tta.RUNNERS}
    for round_index in range(args.rounds):
        shift = round_index % len(tta.RUNNERS)
        for runner in tta.RUNNERS[shift:] + tta.RUNNERS[:shift]:
            results[runner].append(tta.measure(runner))
        print(
            f"  round {round_index + 1}: "
            + ", ".join(
                f"{r} {results[r][-1]['seconds']:.0f} s (epoch {results[r][-1]['epoch']})"
                for r in tta.RUNNERS
            ),
            flush=True,
        )
    fit = statistics.median(x["seconds"] for x in results["fit"])
    print("\n| runner | seconds to target | epochs | vs fit | peak RSS MiB |")
    print("| --- | --- | --- | --- | --- |")
    for runner in tta.RUNNERS:
        seconds = [x["seconds"] for x in results[runner]]
        median = statistics.median(seconds)
        epochs = ", ".join(str(x["epoch"]) for x in results[runner])
        rss = statistics.median(x["rss"] for x in results[runner])
        print(
            f"| {runner} | {median:.0f}{_spread(seconds)} | {epochs} | "
            f"{median / fit:.2f}x | {rss:,.0f} |"
        )


if __name__ == "__main__":
    main()
