"""Preemption: SIGTERM, SIGINT or SIGHUP asks a run to stop at the next step boundary.

The first signal is recorded; the controller then saves a checkpoint of
the step it reached (all workers agree on that step, see
``ParallelMode.agree_to_stop``) and the process exits with ``128 + the
signal's number`` (143 for SIGTERM, 130 for SIGINT, 129 for SIGHUP: a
terminal that closed). A second signal ends the process at once, saving
nothing.

Python runs signal handlers in the main thread between bytecodes, and the
main thread spends a loop of steps inside one TensorFlow call: a handler
would run only when the loop ends, and two signals within one loop would
look like one. So the C-level handler's wake-up byte
(``signal.set_wakeup_fd``), one per signal, is read by a thread of its
own, which answers a signal as soon as it gets the interpreter (while
TensorFlow computes, it has released it); the Python-level handler only
stands by. Should something else take the wake-up descriptor, that handler
answers instead, late, as before. A second
signal ends the process wherever it is, even in the middle of writing a
checkpoint (a damaged checkpoint is set aside at the next start).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from tftrain import lifeline

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Stopped(Exception):
    """The run stopped early on a signal, after saving its checkpoint."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


class StopRequest:
    def __init__(self):
        self.signum: int | None = None
        self._first_at = 0.0
        self._wakeup: int | None = None  # the write end of the wake-up pipe
        self._watcher: threading.Thread | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> StopRequest:
        """Takes SIGTERM, SIGINT and SIGHUP (from the main thread; again after any
        library that may have set its own handlers)."""
        if self._wakeup is None:
            read, self._wakeup = os.pipe()
            os.set_blocking(self._wakeup, False)
            self._watcher = threading.Thread(
                target=self._watch, args=(read,), name="tftrain-signals", daemon=True
            )
            self._watcher.start()
        signal.set_wakeup_fd(self._wakeup, warn_on_full_buffer=False)
        for sig in _SIGNALS:
            signal.signal(sig, self._in_main_thread)
        return self

    def _watch(self, read: int) -> None:
        while True:
            for signum in os.read(read, 64):
                if signum in _SIGNALS:
                    self._on_signal(signum)

    def _in_main_thread(self, signum, _frame) -> None:
        """The Python-level handler, run whenever the main thread gets to it.
        The watcher has answered the signal already, unless something took
        the wake-up descriptor over (then it is answered here, and the
        descriptor taken back)."""
        previous = signal.set_wakeup_fd(self._wakeup, warn_on_full_buffer=False)
        if previous != self._wakeup or not self._watcher.is_alive():
            self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if lifeline.launcher_gone():
            # Nobody reads the console any more: a write to it must not fail the save.
            lifeline.silence()
        if self.signum is not None:
            if (
                signum == signal.SIGTERM
                and lifeline.launcher_pid() is not None
                and time.monotonic() - self._first_at < 2.0
            ):
                # A dying launcher's kernel notice comes once per thread of it.
                return
            try:
                print(f"tftrain: {name} again: stopping now, saving nothing.", file=sys.stderr)
                sys.stderr.flush()
            finally:
                os._exit(128 + signum)
        self.signum, self._first_at = signum, time.monotonic()
        try:
            print(
                f"tftrain: {name}: saving a checkpoint at the end of the current loop of "
                "steps, then stopping (send it again to stop at once).",
                file=sys.stderr,
                flush=True,
            )
        except (OSError, ValueError):  # stderr gone (a closed pipe): the stop still holds
            pass


class NeverStop:
    requested = False
    signum = None
