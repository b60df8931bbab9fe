"""A hang is a failure: end a multi-worker run that stops making progress.

TensorFlow waits forever for a worker that never starts (collective group
formation has no deadline), and a collective's own timeout does not cover
every wait. While it waits, TensorFlow can hold Python's GIL, so neither a
thread nor a signal handler of the stuck process gets to run. The watchdog
is therefore a small separate process: the run sends it a line at each
stage; if none comes for ``timeout_secs``, it SIGKILLs the run, then says
what the run was waiting for (kill first: a console that is gone cannot
stop the kill): the run itself if it was stopped (SIGSTOP, Ctrl-Z, a
debugger), else the other tasks whose ports refuse a connection.
"""

from __future__ import annotations

import os
import subprocess
import sys

# The watcher: no TensorFlow, starts in milliseconds. It reads stage lines on
# stdin; "\x04" (or end of input: the run exited) ends it quietly.
_WATCHER = r"""
import os, select, signal, sys, time
# A signal to the run's process group asks the run to save and stop; the
# watcher keeps watching that save.
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
parent, timeout, peers = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]


def stopped(pid):
    # Linux's process state: T stopped by a signal, t stopped by a tracer.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def gone(peers):
    import socket
    names = []
    for peer in peers:
        name, _, address = peer.partition("=")
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=1).close()
        except ConnectionRefusedError:
            names.append(f"{name} at {address}")
        except (OSError, ValueError):
            pass  # slow or unreachable: not known to be gone
    return names


stage, last, buf = "starting", time.monotonic(), b""
while True:
    ready, _, _ = select.select([0], [], [], 1.0)
    if ready:
        chunk = os.read(0, 4096)
        if not chunk:
            sys.exit(0)
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line == b"\x04":
                sys.exit(0)
            stage, last = line.decode(errors="replace"), time.monotonic()
    elif time.monotonic() - last > timeout:
        idle = time.monotonic() - last
        frozen = stopped(parent)
        try:
            os.kill(parent, signal.SIGKILL)
        except ProcessLookupError:
            pass
        said = f"tftrain: error: no progress for {idle:.0f} s while {stage}: "
        if frozen:
            said += ("this task was stopped (SIGSTOP, Ctrl-Z or a debugger), so the cluster "
                     "could not go on without it; ended it.")
        else:
            lost = gone(peers)
            said += (f"nothing answers at {', '.join(lost)}: died or never started" if lost
                     else "another task of the cluster died, froze or never started")
            said += (f" (or --collective_timeout_secs={timeout:g} is too short for one loop "
                     "of --steps_per_loop steps).")
        try:
            sys.stderr.write(said + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        sys.exit(1)
"""


class Watchdog:
    """Kills this process when ``kick`` has not been called for ``timeout_secs``."""

    def __init__(self, timeout_secs: float, cluster=None):
        """``cluster``: this task's ``Cluster``; its other tasks are the ones
        a kill's message can name."""
        self.timeout_secs = float(timeout_secs)
        peers = [] if cluster is None else _peers(cluster)
        self._process = subprocess.Popen(
            [sys.executable, "-c", _WATCHER, str(os.getpid()), str(self.timeout_secs), *peers],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            # The console itself: file descriptor 2 may be tftrain.quiet's
            # filter, which dies with the process this watchdog kills.
            stderr=sys.stderr,
        )

    def kick(self, stage: str) -> None:
        """Reports progress; ``stage`` says what the run does next."""
        self._send(stage.replace("\n", " ") + "\n")

    def stop(self) -> None:
        self._send("\x04\n")
        try:
            self._process.stdin.close()
        except BrokenPipeError:  # the watcher is already gone
            pass
        self._process.wait()

    def _send(self, text: str) -> None:
        try:
            self._process.stdin.write(text.encode())
            self._process.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass


def _peers(cluster) -> list[str]:
    """``type:index=address`` of each task of ``cluster`` but this one (and
    the evaluator, which runs no server)."""
    return [
        f"{task_type}:{index}={address}"
        for task_type, addresses in cluster.cluster.items()
        for index, address in enumerate(addresses)
        if task_type != "evaluator"
        and (task_type, index) != (cluster.task_type, cluster.task_index)
    ]


class NoWatchdog:
    """The single-process stand-in: nothing to wait for."""

    def kick(self, stage: str) -> None:
        pass

    def stop(self) -> None:
        pass
