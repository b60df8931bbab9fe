"""Pipeline model parallelism on this machine, as ratios from one run.

Throughput: the same training (an MLP of ``--hidden_units`` on Fashion-MNIST,
global batch ``--batch_size``) as separate ``tftrain`` processes:

  one_device            the whole model on one device (baseline)
  2 stages M=1          --strategy=model_parallel --num_microbatches=1: the
                        stages run one after another (naive placement)
  2 stages M=4 / M=8    the pipeline, GPipe schedule
  ... launched          the same with each stage in its own process
                        (``tftrain launch --num_workers=2``)

It prints examples/second (steady state, as metrics.json has it), the
ratio of each pipeline to its naive placement, and the pipeline bubble
predicted, (K-1)/(M+K-1), against the idle share measured:
1 - T_naive / (K * T_pipelined) from the step times (with K equal stages
and nothing but the bubble in the way, the two agree; anything a micro-batch
costs beyond its share of the work shows up as more idle share). The runs go round
``--rounds`` times in rotated order; each figure is the median.

Memory: one process each for ``--memory_batch`` examples cut into 16
micro-batches, GPipe against 1F1B (and M=1): the peak resident memory of
the process (``ru_maxrss`` from wait4) beside the peak activation bytes
tftrain computes from the schedule (metrics.json).

    .venv/bin/python -m benchmarks.pipeline [--steps=600] [--rounds=3] [--only=...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from benchmarks.common import run


def train_flags(args, model_dir, steps, batch_size, extra):
    return [
        "--dataset=fashion_mnist",
        "--model=mlp",
        f"--hidden_units={args.hidden_units}",
        f"--batch_size={batch_size}",
        f"--train_steps={steps}",
        f"--steps_per_loop={min(steps, 100)}",
        f"--eval_interval={steps}",
        f"--checkpoint_interval={steps}",
        "--noexport",
        f"--model_dir={model_dir}",
        *extra,
    ]


def throughput(args, extra, launched=False) -> float:
    with tempfile.TemporaryDirectory() as model_dir:
        flags = train_flags(args, model_dir, args.steps, args.batch_size, extra)
        command = ["launch", "--num_workers=2", "--", *flags] if launched else ["train", *flags]
        return run(command, model_dir)[0]["examples_per_second"]


def memory(args, extra) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as model_dir:
        flags = train_flags(args, model_dir, 20, args.memory_batch, extra)
        metrics, rss = run(["train", *flags], model_dir)
        held = sum(s["peak_activation_bytes"] for s in metrics.get("pipeline_stages", []))
        return rss, held


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--hidden_units", default="1024,1024")
    parser.add_argument("--memory_batch", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated run names")
    args = parser.parse_args()
    mp = ["--strategy=model_parallel", "--num_stages=2"]
    runs = [
        ("one_device", ["--strategy=one_device"], False),
        # The same micro-batches on one device (gradient accumulation): what
        # cutting the batch costs by itself, without stages.
        ("one_device M=4", ["--strategy=one_device", "--num_microbatches=4"], False),
        ("one_device M=8", ["--strategy=one_device", "--num_microbatches=8"], False),
        ("2 stages M=1", [*mp, "--num_microbatches=1"], False),
        ("2 stages M=4", [*mp, "--num_microbatches=4"], False),
        ("2 stages M=8", [*mp, "--num_microbatches=8"], False),
        ("2 stages M=1 launched", [*mp, "--num_microbatches=1"], True),
        ("2 stages M=4 launched", [*mp, "--num_microbatches=4"], True),
        ("2 stages M=8 launched", [*mp, "--num_microbatches=8"], True),
    ]
    if args.only:
        wanted = {name.strip() for name in args.only.split(",")}
        runs = [r for r in runs if r[0] in wanted]
    speeds: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    for round_ in range(args.rounds):
        order = runs[round_ % len(runs) :] + runs[: round_ % len(runs)]
        for name, extra, launched in order:
            speeds[name].append(throughput(args, extra, launched))
            print(f"round {round_ + 1}: {name}: {speeds[name][-1]:,.0f} examples/s", flush=True)
    median = {name: statistics.median(v) for name, v in speeds.items()}
    print(
        f"\nMLP {args.hidden_units}, batch {args.batch_size}, {args.steps} steps, "
        f"median of {args.rounds}:"
    )
    print(
        "| run | examples/s (min-max) | vs one_device | vs its M=1 | bubble predicted "
        "| idle share measured |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, _, launched in runs:
        m = int(name.split("M=")[1].split()[0]) if "M=" in name else None
        naive = "2 stages M=1" + (" launched" if launched else "")
        row = [
            name,
            f"{median[name]:,.0f} ({min(speeds[name]):,.0f}-{max(speeds[name]):,.0f})",
            f"{median[name] / median['one_device']:.2f}" if "one_device" in median else "-",
        ]
        if m and naive in median and name.startswith("2 stages"):
            # Step time is batch / speed; the bubble from T_naive and T_pipelined.
            measured = 1 - (1 / median[naive]) / (2 * (1 / median[name]))
            row += [
                f"{median[name] / median[naive]:.2f}",
                f"{(2 - 1) / (m + 2 - 1):.0%}",
                f"{measured:.0%}",
            ]
        else:
            row += ["-", "-", "-"]
        print("| " + " | ".join(row) + " |")
    if args.memory_batch:
        print(
            f"\nPeak memory, batch {args.memory_batch} in 16 micro-batches "
            f"(M=1: one), 2 stages, MLP {args.hidden_units}:"
        )
        print("| schedule | peak RSS MiB | activations held at the peak (computed) MiB |")
        print("| --- | --- | --- |")
        for name, extra in (
            ("M=1", ["--num_microbatches=1"]),
            ("gpipe, M=16", ["--num_microbatches=16", "--pipeline_schedule=gpipe"]),
            ("1f1b, M=16", ["--num_microbatches=16", "--pipeline_schedule=1f1b"]),
        ):
            rss, held = memory(args, [*mp, *extra])
            print(f"| {name} | {rss:,.0f} | {held / 2**20:,.1f} |", flush=True)


if __name__ == "__main__":
    main()
