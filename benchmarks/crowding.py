"""How much slower two tasks computing side by side on this machine are
than one of them alone: the crowding factor ``tftrain plan`` measures,
with the same request, here on its own so that it can be compared with
real runs (BUILD_NOTES.md, "round four"):

    .venv/bin/python -m benchmarks.crowding BATCH [--pinned] [--lockstep=N] [--replica] \
        -- TRAIN_FLAGS...

BATCH: each task's batch (a 2-worker run's global batch over 2). Each task
gets 1 intra-op thread and the thread settings ``tftrain launch`` gives a
task; ``--pinned``: each task (and, alone, the one task) on its share of
the cores, as ``tftrain launch`` pins two tasks; ``--lockstep=N``: N steps, each
ending when both tasks have finished it, as a synchronous all-reduce
makes them (alone: the same one-step stretches); ``--replica``: the tasks
side by side each step through the strategy, as one replica of a
data-parallel run (``tftrain plan``'s replica probe; alone stays one_device).
Medians of 2 rounds.
"""

from __future__ import annotations

import statistics
import sys


def main(argv: list[str]) -> None:
    from tftrain import plan, resources

    if "--" not in argv or len(argv) < 4:
        sys.exit(
            "usage: python -m benchmarks.crowding BATCH [--pinned] [--lockstep=N] [--replica] "
            "-- TRAIN_FLAGS..."
        )
    head, train_argv = argv[1 : argv.index("--")], argv[argv.index("--") + 1 :]
    batch, pinned = int(head[0]), "--pinned" in head
    lockstep = [int(h.split("=", 1)[1]) for h in head if h.startswith("--lockstep=")]
    replica = "--replica" in head
    request = {
        "train_argv": train_argv,
        "threads": 1,
        "inter_op_threads": resources.cluster_inter_op_threads(2),
        "thread_spinning": False,
        "batches": [batch],
        "seconds": 4.0,
        "lockstep": lockstep[0] if lockstep else None,
    }
    # Pinned alone: on the cores the first of two pinned tasks would get.
    share = resources.core_share(0, 2) if pinned else None
    alone_request = dict(request, cores=share) if share else request
    # --replica: the tasks side by side each step through the strategy, as
    # one replica of a data-parallel run (the alone figure stays one_device's).
    side_request = dict(request, mode=plan.REPLICA) if replica else request
    alone = [
        1 / plan._probe("compute", alone_request)["steps_per_second"][str(batch)] for _ in range(2)
    ]
    side = [
        statistics.mean(
            1 / r["steps_per_second"][str(batch)]
            for r in plan._probes_side_by_side(side_request, 2, pinned=pinned)
        )
        for _ in range(2)
    ]
    a, s = statistics.median(alone), statistics.median(side)
    for what, median, rounds in (("one task alone", a, alone), ("two side by side", s, side)):
        each = ", ".join(f"{t * 1e3:.1f}" for t in rounds)
        print(f"{what}: {median * 1e3:.1f} ms a step (rounds: {each})")
    how = [w for w, on in (("pinned", pinned), ("lockstep", lockstep)) if on]
    print(f"crowding: {s / a:.2f}" + (f" ({', '.join(how)})" if how else ""))


if __name__ == "__main__":
    main(sys.argv)
