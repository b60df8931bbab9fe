"""Keeps TensorFlow's C++ start-up lines off a person's console.

TensorFlow 2.21 prints them before its logging is set up, so
``TF_CPP_MIN_LOG_LEVEL`` cannot silence them: a note that logging is not
set up, oneDNN's round-off notice, a CUDA probe's "could not find cuda
drivers" and "failed call to cuInit" on a machine without GPUs, and the CPU
instruction notice, each twice; and oneDNN's notice, on a CPU without
AVX-512, that bfloat16 runs on TensorFlow's own kernels, as the first
bfloat16 op is built. :func:`filter_native_stderr` sends what the
C++ runtime writes to file descriptor 2 through a filter that drops exactly
those lines and passes everything else on; Python's own ``sys.stderr``
(tftrain's errors, tracebacks) keeps writing straight to the console, so
nothing it says can be held up or lost when the process exits. The filter is
a small process of its own, so what TensorFlow writes just before a crash
still reaches the console.
"""

from __future__ import annotations

import os
import re
import sys

NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|^[IWE]\d{4} [\d:. ]+\d+ (port\.cc|cudart_stub\.cc|cuda_platform\.cc|cuda_executor\.cc"
    r"|cpu_feature_guard\.cc)"
    r"|^[IWE]\d{4} [\d:. ]+\d+ util\.cc:\d+\] oneDNN supports DT_BFLOAT16 only on platforms"
    r"|^To enable the following instructions: .* rebuild TensorFlow"
)


def is_noise(line: str) -> bool:
    return bool(NOISE.search(line))


# The filter runs in its own small process, so that what TensorFlow writes just
# before a crash (a failed CHECK, an abort) still reaches the console: the
# filter reads until every writer is gone, then exits.
_FILTER = """
import os, sys
from tftrain.quiet import is_noise
out = os.fdopen(1, "wb", buffering=0)
for raw in os.fdopen(0, "rb"):
    if not is_noise(raw.decode(errors="replace")):
        out.write(raw)
"""


def filter_native_stderr() -> None:
    """Filters what is written to file descriptor 2 from now on (see above)."""
    import subprocess

    try:
        console = os.dup(2)
        read_end, write_end = os.pipe()
        subprocess.Popen(
            [sys.executable, "-c", _FILTER],
            stdin=read_end,
            stdout=console,
            stderr=console,
            env={**os.environ, "PYTHONPATH": _package_root()},
            start_new_session=False,
        )
    except OSError:
        return
    os.close(read_end)
    sys.stderr.flush()
    sys.stderr = os.fdopen(console, "w", buffering=1, errors="backslashreplace")
    os.dup2(write_end, 2)
    os.close(write_end)


def _package_root() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rest = os.environ.get("PYTHONPATH")
    return here + (os.pathsep + rest if rest else "")
