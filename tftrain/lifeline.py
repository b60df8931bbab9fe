"""A run outlives neither its launcher nor its console.

A task of ``tftrain launch`` runs in a session of its own (so that a Ctrl-C
reaches the launcher only, which then stops every task in order). Nothing
would tell such a task that the launcher died: it would train on with
nobody reading its output, or, stuck waiting on a peer, wait forever. So a
launched task asks the kernel for SIGTERM when its parent dies
(``PR_SET_PDEATHSIG``) and answers it as any SIGTERM: a checkpoint of the
step it reached, then exit 143.

Its output is then a pipe nobody reads. A write to it fails, and a failed
write must not end a run that is saving its work, so :func:`say` sends the
console to ``/dev/null`` when a write fails (a closed pipe: ``tftrain train
| head``; a terminal that hung up) and the run goes on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

LAUNCHER_PID = "TFTRAIN_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def launcher_pid() -> int | None:
    """The pid of the ``tftrain launch`` that started this process, if any."""
    try:
        return int(os.environ[LAUNCHER_PID])
    except (KeyError, ValueError):
        return None


def follow_launcher() -> bool:
    """In a launched task: SIGTERM to this process when the launcher dies
    (at once if it is already gone). Returns whether the kernel took the
    request (Linux only; elsewhere a task outlives a killed launcher)."""
    pid = launcher_pid()
    if pid is None or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        taken = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    if launcher_gone():  # it died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)
    return taken


def launcher_gone() -> bool:
    """Whether this is a launched task whose launcher has died."""
    pid = launcher_pid()
    return pid is not None and os.getppid() != pid


def silence() -> None:
    """Sends everything this process writes to its console to /dev/null."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    fds = {1, 2}  # and Python's own streams, which may be other descriptors
    for stream in (sys.stdout, sys.stderr):
        try:
            fds.add(stream.fileno())
        except (AttributeError, OSError, ValueError):
            pass
    for fd in fds:
        try:
            os.dup2(devnull, fd)
        except OSError:
            pass
    os.close(devnull)


def say(line: str, file=None) -> None:
    """Prints ``line``; when the console is gone, silences it and goes on."""
    stream = file or sys.stdout
    try:
        print(line, file=stream, flush=True)
    except (OSError, ValueError):
        silence()


def signal_group(process: subprocess.Popen, sig: int) -> None:
    """``sig`` to ``process`` and everything in its process group (it leads
    one: started with ``process_group=0`` or a session of its own)."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def stop_groups(processes, grace: float) -> None:
    """SIGTERM to the group of every live process in ``processes``, SIGKILL
    to those still alive ``grace`` seconds later; returns once each has
    exited. Only unreaped processes are signalled, so a pid is never one the
    kernel has given to another process since."""
    live = [p for p in processes if p.poll() is None]
    for p in live:
        signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in live:
        try:
            p.wait(max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            signal_group(p, signal.SIGKILL)
            p.wait()
