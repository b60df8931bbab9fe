"""Keeps TensorFlow's C++ start-up lines off a person's console.

TensorFlow 2.21 prints them before its logging is set up, so
``TF_CPP_MIN_LOG_LEVEL`` cannot silence them: a note that logging is not
set up, oneDNN's round-off notice, a CUDA probe's "could not find cuda
drivers" and "failed call to cuInit" on a machine without GPUs, and the CPU
instruction notice, each twice. :func:`filter_native_stderr` sends what the
C++ runtime writes to file descriptor 2 through a filter that drops exactly
those lines and passes everything else on; Python's own ``sys.stderr``
(tftrain's errors, tracebacks) keeps writing straight to the console, so
nothing it says can be held up or lost when the process exits. A child
process that may speak after this one is killed (the watchdog) must be given
``sys.stderr``, not the inherited descriptor 2.
"""

from __future__ import annotations

import os
import re
import sys
import threading

NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|^[IWE]\d{4} [\d:. ]+\d+ (port\.cc|cudart_stub\.cc|cuda_platform\.cc|cuda_executor\.cc"
    r"|cpu_feature_guard\.cc)"
    r"|^To enable the following instructions: .* rebuild TensorFlow"
)


def is_noise(line: str) -> bool:
    return bool(NOISE.search(line))


def filter_native_stderr() -> None:
    """Filters what is written to file descriptor 2 from now on (see above)."""
    try:
        console = os.dup(2)
        read_end, write_end = os.pipe()
    except OSError:
        return
    sys.stderr.flush()
    sys.stderr = os.fdopen(os.dup(console), "w", buffering=1, errors="backslashreplace")
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb") as native, os.fdopen(console, "wb", buffering=0) as out:
            for raw in native:
                if not is_noise(raw.decode(errors="replace")):
                    out.write(raw)

    threading.Thread(target=pump, name="tftrain-stderr-filter", daemon=True).start()
