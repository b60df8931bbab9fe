"""Serving roles: a task whose TensorFlow server another task drives (a
parameter server, a coordinator's worker, a pipeline stage's host)."""

from __future__ import annotations

import socket
import sys
import time

from tftrain.errors import ConfigError

# A serving task whose driver has been gone this long exits 0.
COORDINATOR_GONE_SECS = 3.0


def serve(cluster, wait_secs: float, inter_op_threads: int, driver=("chief", 0)) -> int:
    """Starts this task's TensorFlow server and serves until the task that
    drives the run (``driver``: its type and index) is gone; returns the exit
    code (0, or 1 if the driver never appeared within ``wait_secs``)."""
    import signal

    import tensorflow as tf

    # The coordinator decides when the run ends: a SIGTERM sent to the whole
    # cluster must not take this task away while the coordinator saves.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    config = tf.compat.v1.ConfigProto()
    config.inter_op_parallelism_threads = inter_op_threads
    try:
        tf.distribute.Server(
            tf.train.ClusterSpec({k: list(v) for k, v in cluster.cluster.items()}),
            job_name=cluster.task_type,
            task_index=cluster.task_index,
            protocol="grpc",
            config=config,
            start=True,
        )
    except tf.errors.OpError as e:
        raise ConfigError(
            f"could not start this task's server on {cluster.address} "
            f"({e.message.strip().splitlines()[0]}): is another program using that port?"
        ) from None
    me = f"{cluster.task_type}:{cluster.task_index}"
    print(f"{me} serving on {cluster.address}; waiting for the coordinator.", flush=True)
    driver_address = cluster.cluster[driver[0]][driver[1]]
    host, port = cluster.host_of(*driver), int(driver_address.rsplit(":", 1)[1])
    started, seen, gone_since = time.monotonic(), False, None
    while True:
        up = _reachable(host, port)
        now = time.monotonic()
        if up and not seen:
            print(f"{me} joined the coordinator's run.", flush=True)
        if up:
            seen, gone_since = True, None
        elif seen:
            gone_since = gone_since or now
            if now - gone_since >= COORDINATOR_GONE_SECS:
                print(f"{me}: the coordinator is done; exiting.", flush=True)
                return 0
        elif now - started > wait_secs:
            print(
                f"tftrain: error: the coordinator ({driver[0]} at {driver_address}) "
                f"did not appear within {wait_secs:g} s (--collective_timeout_secs).",
                file=sys.stderr,
                flush=True,
            )
            return 1
        time.sleep(1.0)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
