"""Preemption: SIGTERM or SIGINT asks a run to stop at the next step boundary.

The first signal is recorded; the controller then saves a checkpoint of
the step it reached (all workers agree on that step, see
``ParallelMode.agree_to_stop``) and the process exits with ``128 + the
signal's number`` (143 for SIGTERM, 130 for SIGINT). A second signal ends
the process at once, saving nothing.
"""

from __future__ import annotations

import os
import signal
import sys


class Stopped(Exception):
    """The run stopped early on a signal, after saving its checkpoint."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


class StopRequest:
    def __init__(self):
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            print(f"tftrain: {name} again: stopping now, saving nothing.", file=sys.stderr)
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum
        print(
            f"tftrain: {name}: saving a checkpoint at the end of the current loop of steps, "
            "then stopping (send it again to stop at once).",
            file=sys.stderr,
            flush=True,
        )


class NeverStop:
    requested = False
    signum = None
