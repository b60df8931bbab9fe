"""Where a training step's time goes: one profiled stretch of a one-device
``tftrain train`` run, its ops summed per step and grouped by kind.

    .venv/bin/python -m benchmarks.step_profile [--experiment=fashion_mnist_cnn]
        [--warmup=300] [--steps=100] [--top=25] [-- MORE TFTRAIN TRAIN FLAGS]

It trains ``--warmup`` steps, traces the next ``--steps`` (``--profile_steps``),
and reads the trace: the wall time a step took (the traced span over the
steps) and each op's time a step. Ops run on several executor threads at
once, so their times add up to more than the wall time, and two ops sharing
the cores each run slower than alone. Kinds: matrix products (convolutions
and matmuls, forward and backward, what the race's bound counts), the
optimizer's update, and the rest (element-wise work, pooling, loss,
statistics, the loop itself).

Nothing else may run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile

from benchmarks.common import run

# Executor bookkeeping on the op threads, not ops.
_NOT_OPS = re.compile(r"^(ExecutorState::|ParallelFor|ThreadpoolListener::|Memory|Iterator)")
_PRODUCTS = re.compile(r"(Conv2D|Conv3D|MatMul|Einsum)")
_OPTIMIZERS = re.compile(r"(^|/)(adam|adagrad|SGD)(_\d+)?/")
_LOOP_SCOPES = re.compile(r"while/body/_\d+/|while/")


def kind(node: str, op_type: str) -> str:
    if _PRODUCTS.search(op_type):
        return "matrix products"
    if _OPTIMIZERS.search(node):
        return "optimizer update"
    return "the rest"


def summarize(events, steps: int) -> dict:
    """``events``: (thread, name, start_ns, duration_ns) of a trace's ops.
    Returns the wall ms a step, ms a step by kind and by op (summed over
    threads), and calls a step by op."""
    by_op, calls, by_kind = collections.Counter(), collections.Counter(), collections.Counter()
    first, last = None, None
    for _, name, start, duration in events:
        if _NOT_OPS.match(name):
            continue
        node, _, op_type = name.partition(":")
        node = _LOOP_SCOPES.sub("", node)
        ms = duration / 1e6 / steps
        by_op[(node, op_type)] += ms
        calls[(node, op_type)] += 1 / steps
        by_kind[kind(node, op_type)] += ms
        first = start if first is None else min(first, start)
        last = start + duration if last is None else max(last, start + duration)
    if first is None:
        raise SystemExit("the trace holds no ops: did the run reach the profiled steps?")
    return {
        "wall_ms": (last - first) / 1e6 / steps,
        "by_kind": by_kind,
        "by_op": by_op,
        "calls": calls,
    }


def profile(experiment: str, warmup: int, steps: int, flags: list[str]) -> tuple[dict, dict]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tftrain import _internal

    # One more stretch after the traced one: the run's closing evaluation
    # and checkpoint come after the trace has stopped.
    total = warmup + 2 * steps
    with tempfile.TemporaryDirectory() as model_dir:
        metrics, _ = run(
            [
                "train",
                f"--experiment={experiment}",
                f"--train_steps={total}",
                f"--steps_per_loop={steps}",
                f"--profile_steps={warmup},{warmup + steps}",
                f"--eval_interval={total}",
                f"--checkpoint_interval={total}",
                "--noexport",
                f"--model_dir={model_dir}",
                *flags,
            ],
            model_dir,
        )
        traces = glob.glob(os.path.join(model_dir, "plugins", "profile", "*", "*.xplane.pb"))
        if not traces:
            raise SystemExit(f"no trace under {model_dir}/plugins/profile")
        return summarize(_internal.trace_op_events(traces[0]), steps), metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="fashion_mnist_cnn")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("flags", nargs="*", help="more `tftrain train` flags, after --")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    summary, metrics = profile(args.experiment, args.warmup, args.steps, args.flags)
    wall = summary["wall_ms"]
    total = sum(summary["by_kind"].values())
    print(
        f"{args.experiment}, steps {args.warmup + 1}-{args.warmup + args.steps} traced "
        f"(the run: {metrics['examples_per_second']:,.0f} examples/s)\n"
        f"wall time a step: {wall:.2f} ms; its ops, summed over the executor threads: "
        f"{total:.2f} ms ({total / wall:.2f} threads busy on average)\n"
    )
    print("| kind | ms a step (summed over threads) | share of op time |")
    print("| --- | --- | --- |")
    for name, ms in summary["by_kind"].most_common():
        print(f"| {name} | {ms:.2f} | {ms / total:.0%} |")
    print(f"\nThe {args.top} costliest ops:\n")
    print("| ms a step | share | calls a step | op | type |")
    print("| --- | --- | --- | --- | --- |")
    for (node, op_type), ms in summary["by_op"].most_common(args.top):
        calls = summary["calls"][(node, op_type)]
        print(f"| {ms:.3f} | {ms / total:.1%} | {calls:.1f} | {node} | {op_type} |")


if __name__ == "__main__":
    main()
