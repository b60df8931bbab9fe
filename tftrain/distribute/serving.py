"""Serving roles: a task whose TensorFlow server another task drives (a
parameter server, a coordinator's worker, a pipeline stage's host)."""

from __future__ import annotations

import json
import os
import socket
import sys
import time

from tftrain import fileio, lifeline
from tftrain.errors import ConfigError

# A serving task whose driver has been gone this long exits 0.
COORDINATOR_GONE_SECS = 3.0


class Driver:
    """The task that drives a run (the chief, else worker 0), watched from a
    task that waits on it: ``poll()`` says ``"waiting"`` (not seen yet),
    ``"up"``, ``"gone"`` (seen, then away for COORDINATOR_GONE_SECS) or
    ``"missing"`` (never seen within ``wait_secs``)."""

    def __init__(self, cluster, wait_secs: float):
        self.task = cluster.training_tasks()[0]
        self.address = cluster.cluster[self.task[0]][self.task[1]]
        self._host = cluster.host_of(*self.task)
        self._port = int(self.address.rsplit(":", 1)[1])
        self.wait_secs = wait_secs
        self.seen = False
        self._started, self._gone_since = time.monotonic(), None

    def poll(self) -> str:
        now = time.monotonic()
        if _reachable(self._host, self._port):
            self.seen, self._gone_since = True, None
            return "up"
        if self.seen:
            self._gone_since = self._gone_since or now
            return "gone" if now - self._gone_since >= COORDINATOR_GONE_SECS else "up"
        return "missing" if now - self._started > self.wait_secs else "waiting"

    def never_came(self) -> str:
        return (
            f"the coordinator ({self.task[0]} at {self.address}) did not appear within "
            f"{self.wait_secs:g} s (--collective_timeout_secs)."
        )


# Flags that may differ between the tasks of one run.
PER_TASK_FIELDS = frozenset(
    {"intra_op_threads", "inter_op_threads", "thread_spinning", "restart", "ring_port"}
)


def contradictions(mine: dict, drivers: dict) -> list[str]:
    """The flags of this task that differ from the driving task's (its
    config.json), as ``--name=mine here, theirs on the driver``."""
    mine = json.loads(json.dumps(mine))  # tuples as the driver's JSON has them
    return [
        f"--{name}={mine[name]} here, {drivers.get(name)} on the coordinator"
        for name in sorted(mine)
        if name not in PER_TASK_FIELDS and mine[name] != drivers.get(name)
    ]


def _drivers_config(config, since: float) -> dict | None:
    """The driving task's config.json in model_dir, once it is written for
    this run (not before ``since``); None until then, or where model_dir is
    not shared with this task."""
    path = os.path.join(config.model_dir, "config.json")
    try:
        if fileio.mtime(path) < since:
            return None
        return json.loads(fileio.read_text(path))
    except (OSError, ValueError):
        return None


def serve(cluster, wait_secs: float, inter_op_threads: int, config=None) -> int:
    """Starts this task's TensorFlow server and serves until the task that
    drives the run (:class:`Driver`) is gone; returns the exit code (0, 1 if
    the driver never appeared within ``wait_secs``, 2 if this task's flags
    (``config``) contradict the driver's: the config.json it writes into a
    model_dir this task can read)."""
    import signal

    import tensorflow as tf

    # The coordinator decides when the run ends: a SIGTERM sent to the whole
    # cluster must not take this task away while the coordinator saves.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    session = tf.compat.v1.ConfigProto()
    session.inter_op_parallelism_threads = inter_op_threads
    try:
        tf.distribute.Server(
            tf.train.ClusterSpec({k: list(v) for k, v in cluster.cluster.items()}),
            job_name=cluster.task_type,
            task_index=cluster.task_index,
            protocol="grpc",
            config=session,
            start=True,
        )
    except tf.errors.OpError as e:
        raise ConfigError(
            f"could not start this task's server on {cluster.address} "
            f"({e.message.strip().splitlines()[0]}): is another program using that port?"
        ) from None
    me = f"{cluster.task_type}:{cluster.task_index}"
    lifeline.say(f"{me} serving on {cluster.address}; waiting for the coordinator.")
    driver = Driver(cluster, wait_secs)
    started, checked = time.time(), config is None
    while True:
        seen = driver.seen
        state = driver.poll()
        if state == "up" and not seen:
            lifeline.say(f"{me} joined the coordinator's run.")
        if state == "up" and not checked:
            drivers = _drivers_config(config, started)
            if drivers is not None:
                checked = True
                differ = contradictions(config.to_dict(), drivers)
                if differ:
                    lifeline.say(
                        f"tftrain: error: {me} was started with flags that contradict the "
                        f"coordinator's ({'; '.join(differ[:3])}"
                        + (f"; {len(differ) - 3} more" if len(differ) > 3 else "")
                        + "): every task of a run takes the same training flags.",
                        file=sys.stderr,
                    )
                    return 2
        elif state == "gone":
            lifeline.say(f"{me}: the coordinator is done; exiting.")
            return 0
        elif state == "missing":
            lifeline.say(f"tftrain: error: {driver.never_came()}", file=sys.stderr)
            return 1
        time.sleep(1.0)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
