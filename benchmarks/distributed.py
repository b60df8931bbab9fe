"""The distributed rows of ``python -m benchmarks``: every parallel mode on
the same model (MLP 256-128, Fashion-MNIST, Adam 1e-3; the ``resnet`` rows:
fashion_mnist_resnet without augmentation), against ``one_device`` at the
same global batch, and one all-reduce of that MLP's
gradients against the ring bound (benchmarks/allreduce.py).

Each row is a separate ``tftrain`` process (``tftrain launch`` for the
launched clusters), 3,000 updates' worth of examples, steady examples/s
from metrics.json. Under ``parameter_server`` a step is one asynchronous
update of a whole global batch by one worker.
"""

from __future__ import annotations

import tempfile

from benchmarks.common import run

STEPS_AT_100 = 3000  # steps of the batch-100 rows; larger batches take fewer
RESNET_STEPS = 120
RESNET = ["--experiment=fashion_mnist_resnet", "--augment=false", "--max_eval_examples=1000"]
# name: (global batch, tftrain train flags, (workers, ps) to launch or None)
ROWS = {
    "one_device": (100, ["--strategy=one_device"], None),
    "mirrored x2": (100, ["--strategy=mirrored", "--num_replicas=2"], None),
    "2 workers": (100, ["--strategy=multi_worker_mirrored"], (2, 0)),
    "one_device b400": (400, ["--strategy=one_device"], None),
    "2 workers b400": (400, ["--strategy=multi_worker_mirrored"], (2, 0)),
    "ps 1 worker": (100, ["--strategy=parameter_server"], (1, 1)),
    "ps 2 workers": (100, ["--strategy=parameter_server"], (2, 1)),
    "pipeline 2 stages": (100, ["--strategy=model_parallel", "--num_stages=2"], None),
    "pipeline 2 launched stages": (
        100,
        ["--strategy=model_parallel", "--num_stages=2"],
        (2, 0),
    ),
    # The ResNet (compute-bound: the ring should hide behind its step).
    "resnet one_device": (128, ["--strategy=one_device", *RESNET], None),
    "resnet 2 workers": (128, ["--strategy=multi_worker_mirrored", *RESNET], (2, 0)),
}


def baseline(name: str) -> str:
    """The one_device row a row is compared with (the same global batch)."""
    batch, model = ROWS[name][0], _model_flags(name)
    return next(
        n
        for n, (b, flags, _) in ROWS.items()
        if b == batch and "--strategy=one_device" in flags and _model_flags(n) == model
    )


def _model_flags(name: str) -> list[str]:
    return [f for f in ROWS[name][1] if not f.startswith("--strategy")]


def allreduce_against_bound(repeats: int = 200) -> tuple[float, float, float]:
    """Seconds of one all-reduce of the MLP's gradients between 2 workers
    with tftrain's ring: in the training graph, the ring alone (NumPy, no
    TensorFlow), and the ring bound."""
    import math

    from benchmarks import allreduce

    nbytes = 4 * sum(math.prod(s) for s in allreduce.SHAPES)
    bound = nbytes / allreduce.loopback_bandwidth()  # 2(N-1)/N = 1 for N = 2
    return allreduce.measure(repeats, "tcp"), allreduce.measure_ring_alone(repeats), bound


def measure(name: str) -> tuple[float, float]:
    """(examples/s, peak RSS MiB of the launching process) of one row."""
    batch, flags, launch = ROWS[name]
    steps = STEPS_AT_100 * 100 // batch
    model = ["--dataset=fashion_mnist", "--model=mlp", "--optimizer=adam", "--learning_rate=0.001"]
    if "--experiment=fashion_mnist_resnet" in flags:
        steps, model = RESNET_STEPS, []
    with tempfile.TemporaryDirectory() as model_dir:
        train = [
            *model,
            f"--batch_size={batch}",
            f"--train_steps={steps}",
            f"--steps_per_loop={min(steps // 3, 100)}",
            f"--eval_interval={steps}",
            f"--checkpoint_interval={steps}",
            "--noexport",
            f"--model_dir={model_dir}",
            *flags,
        ]
        if launch:
            workers, ps = launch
            command = ["launch", f"--num_workers={workers}", f"--num_ps={ps}", "--", *train]
        else:
            command = ["train", *train]
        metrics, rss = run(command, model_dir)
    return metrics["examples_per_second"], rss
