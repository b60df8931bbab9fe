"""Data-parallel throughput on this machine, as ratios from one run.

Runs the same training (MLP 256-128 on Fashion-MNIST, global batch 100)
as separate `tftrain` processes, one after another:

  one_device        baseline
  mirrored x2       2 logical CPU devices (or GPUs) in one process
  1 launched worker multi_worker_mirrored, `tftrain launch --num_workers=1`
  2 launched workers multi_worker_mirrored, `tftrain launch --num_workers=2`
                    (gradients summed by tftrain's TCP ring, the CPU default)
  2 launched, gRPC  the same with `--collective=grpc`: TensorFlow's collectives
  ps: N workers     parameter_server, `tftrain launch --num_workers=N --num_ps=1`
                    (asynchronous: each step one update of the global batch)

and prints examples/second (steady state: the first loop, which traces
the graph, is left out) and the ratios the goals are stated in. This
machine's speed drifts between runs by 10-20%, so the runs go round
`--rounds` times, each round in a rotated order, and each figure is the
median over the rounds.

    .venv/bin/python -m benchmarks.scaling [--steps=3000] [--batch_size=100] [--rounds=3]
        [--only=one_device,ps:2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def throughput(args, strategy_flags, launch=None):
    with tempfile.TemporaryDirectory() as model_dir:
        train = [
            "--dataset=fashion_mnist",
            "--model=mlp",
            f"--batch_size={args.batch_size}",
            f"--train_steps={args.steps}",
            f"--steps_per_loop={args.steps_per_loop}",
            f"--eval_interval={args.steps}",
            f"--checkpoint_interval={args.steps}",
            "--noexport",
            f"--model_dir={model_dir}",
            *strategy_flags,
        ]
        if launch:
            workers, ps = launch
            command = ["launch", f"--num_workers={workers}", f"--num_ps={ps}", "--", *train]
        else:
            command = ["train", *train]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        env.pop("TF_CONFIG", None)
        subprocess.run(
            [sys.executable, "-m", "tftrain", *command],
            cwd=ROOT,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with open(os.path.join(model_dir, "metrics.json")) as f:
            return json.load(f)["examples_per_second"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--steps_per_loop", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated run names (one_device first)")
    args = parser.parse_args()
    runs = [
        ("one_device", ["--strategy=one_device"], None),
        ("mirrored x2", ["--strategy=mirrored", "--num_replicas=2"], None),
        ("1 launched worker", ["--strategy=multi_worker_mirrored"], (1, 0)),
        ("2 launched workers", ["--strategy=multi_worker_mirrored"], (2, 0)),
        ("2 launched, gRPC", ["--strategy=multi_worker_mirrored", "--collective=grpc"], (2, 0)),
        ("ps: 1 worker", ["--strategy=parameter_server"], (1, 1)),
        ("ps: 2 workers", ["--strategy=parameter_server"], (2, 1)),
    ]
    if args.only:
        wanted = args.only.split(",")
        runs = [r for r in runs if r[0] in wanted or r[0] == "one_device"]
    print(
        f"MLP 256-128, Fashion-MNIST, global batch {args.batch_size}, {args.steps} steps, "
        f"{args.steps_per_loop} steps per loop, {os.cpu_count()} CPU cores, "
        f"median of {args.rounds} rounds"
    )
    samples = {name: [] for name, _, _ in runs}
    for r in range(args.rounds):
        order = runs[r % len(runs) :] + runs[: r % len(runs)]
        for name, flags, workers in order:
            samples[name].append(throughput(args, flags, workers))
        print(
            f"  round {r + 1}: "
            + ", ".join(f"{name} {samples[name][-1]:,.0f}" for name, _, _ in runs),
            flush=True,
        )
    speeds = {name: statistics.median(v) for name, v in samples.items()}
    for name, _, _ in runs:
        print(f"  {name:<20}{speeds[name]:>12,.0f} examples/s")
    base = speeds["one_device"]
    for name in speeds:
        if name != "one_device":
            print(f"{name + ' / one_device:':<40}{speeds[name] / base:.2f}")


if __name__ == "__main__":
    main()
