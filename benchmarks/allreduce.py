"""One step's gradient all-reduce between 2 local workers, against the ring bound.

The ring all-reduce moves 2(N-1)/N times the gradient bytes in and out of
each worker, the lower bound for any all-reduce (Patarasuk and Yuan 2009),
so one all-reduce takes at least 2(N-1)/N x bytes / bandwidth. This program
measures the loopback TCP bandwidth between two processes, then times the
all-reduce of the MLP 256-128's gradients (235,146 float32 values) between
2 worker processes under MultiWorkerMirroredStrategy (each pinned to its own
core where there are two, as ``tftrain launch`` pins them), summed by tftrain's
TCP ring and by TensorFlow's gRPC collectives, and prints all three.

    .venv/bin/python -m benchmarks.allreduce [--repeats=200]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The gradients of Dense 784->256, 256->128, 128->10 (kernels and biases).
SHAPES = [(784, 256), (256,), (256, 128), (128,), (128, 10), (10,)]


def loopback_bandwidth(total_bytes: int = 512 << 20, chunk: int = 1 << 20) -> float:
    """Bytes per second of one TCP stream over 127.0.0.1 between two processes."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    sender = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import socket,sys\n"
                f"s=socket.create_connection(('127.0.0.1',{port}))\n"
                f"b=bytes({chunk})\n"
                f"for _ in range({total_bytes // chunk}): s.sendall(b)\n"
                "s.close()\n"
            ),
        ]
    )
    conn, _ = server.accept()
    received, start = 0, time.perf_counter()
    buf = bytearray(chunk)
    while True:
        n = conn.recv_into(buf)
        if not n:
            break
        received += n
    elapsed = time.perf_counter() - start
    sender.wait()
    conn.close()
    server.close()
    return received / elapsed


def worker(repeats: int, collective: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tftrain import resources

    resources.prepare_memory()  # as `tftrain train` does
    import tensorflow as tf

    from tftrain import resources
    from tftrain.config import ExperimentConfig
    from tftrain.distribute import cluster as cluster_lib
    from tftrain.distribute.base import mode_for

    resources.configure_threads(1, 3, spinning=False)  # as `tftrain launch` sets
    config = ExperimentConfig(
        strategy="multi_worker_mirrored", collective=collective, model_dir="/unused"
    ).validate()
    placement = mode_for(config, cluster_lib.from_environment()).setup()
    strategy = placement.strategy
    grads = [tf.random.stateless_normal(s, seed=[1, i]) for i, s in enumerate(SHAPES)]

    def replica_fn():
        if placement.gradient_reducer is not None:
            summed = placement.gradient_reducer.reduce_in_graph(grads)
        else:
            summed = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, grads
            )
        return summed[-1][0]

    @tf.function
    def reduce_n(n):
        # Collectives are stateful: every one of the n runs is kept and ordered.
        for _ in tf.range(n):
            strategy.run(replica_fn)

    reduce_n(tf.constant(5))  # trace, form the group, warm up
    start = time.perf_counter()
    reduce_n(tf.constant(repeats))
    per_reduce = (time.perf_counter() - start) / repeats
    task = json.loads(os.environ["TF_CONFIG"])["task"]
    if task["index"] == 0:
        print(json.dumps({"seconds_per_allreduce": per_reduce}), flush=True)


def ring_alone_worker(rank: int, ports: list[int], repeats: int) -> None:
    """One end of tftrain's ring with no TensorFlow around it: NumPy buffers
    of the MLP's gradient size, each process on its own core where it can."""
    import numpy as np

    from tftrain.distribute.ring import loopback_pair

    ring = loopback_pair(rank, ports)
    values = np.random.default_rng(rank).random(sum(math.prod(s) for s in SHAPES), np.float32)
    for _ in range(20):
        ring.all_reduce(values)
    start = time.perf_counter()
    for _ in range(repeats):
        ring.all_reduce(values)
    if rank == 0:
        print(json.dumps({"seconds_per_allreduce": (time.perf_counter() - start) / repeats}))


def measure_ring_alone(repeats: int) -> float:
    """Seconds per all-reduce of tftrain's ring between 2 plain processes."""
    from tftrain.distribute import launch

    ports = [int(a.rsplit(":", 1)[1]) for a in launch.free_cluster_spec(2)["worker"]]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.allreduce",
                "--ring_alone",
                str(rank),
                *map(str, ports),
            ]
            + [f"--repeats={repeats}"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    if not results[0][0].strip():
        sys.exit(f"the ring alone printed no timing:\n{results[0][1][-3000:]}")
    return json.loads(results[0][0].strip().splitlines()[-1])["seconds_per_allreduce"]


def measure(repeats: int, collective: str) -> float:
    from tftrain.distribute import launch

    spec = launch.free_cluster_spec(2)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.allreduce",
                "--worker",
                f"--repeats={repeats}",
                f"--collective={collective}",
            ],
            cwd=ROOT,
            env=launch.task_env(spec, "worker", i),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    cores = sorted(os.sched_getaffinity(0))
    for i, p in enumerate(procs):  # each on its own core, as `tftrain launch` pins them
        if len(cores) >= 2:
            os.sched_setaffinity(p.pid, {cores[i]})
    results = [p.communicate(timeout=600) for p in procs]
    outs = [out for out, _ in results]
    if not outs[0].strip():
        sys.exit(f"the worker printed no timing:\n{results[0][1][-3000:]}")
    return json.loads(outs[0].strip().splitlines()[-1])["seconds_per_allreduce"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--collective", default="tcp", help=argparse.SUPPRESS)
    parser.add_argument("--ring_alone", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ring_alone:
        rank, *ports = args.ring_alone
        ring_alone_worker(rank, ports, args.repeats)
        return
    if args.worker:
        worker(args.repeats, args.collective)
        return
    nbytes = 4 * sum(math.prod(s) for s in SHAPES)
    bandwidth = loopback_bandwidth()
    n = 2
    bound = 2 * (n - 1) / n * nbytes / bandwidth
    print(f"gradient bytes: {nbytes:,} ({len(SHAPES)} tensors)")
    print(f"loopback TCP bandwidth: {bandwidth / 1e9:.2f} GB/s")
    print(f"ring bound 2(N-1)/N x bytes / bandwidth, N=2: {bound * 1e6:,.0f} us")
    alone = measure_ring_alone(args.repeats)
    print(
        f"tftrain's ring alone (NumPy buffers, no TensorFlow), 2 processes: "
        f"{alone * 1e6:,.0f} us = {alone / bound:.1f}x the bound",
        flush=True,
    )
    for collective, name in (
        ("tcp", "tftrain's TCP ring (--collective=auto on CPUs)"),
        ("grpc", "TensorFlow's gRPC ring, 256 KiB packs (--collective=grpc)"),
    ):
        measured = measure(args.repeats, collective)
        print(
            f"all-reduce, 2 processes, {name}: "
            f"{measured * 1e6:,.0f} us = {measured / bound:.1f}x the bound",
            flush=True,
        )


if __name__ == "__main__":
    main()
