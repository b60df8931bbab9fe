"""Keeps TensorFlow's step-sized buffers in the heap instead of fresh mappings.

glibc serves every allocation above its mmap threshold (128 KiB at start) with
a new mapping and returns it on free. A training step allocates and frees
tensors of about a megabyte many times (the MLP's first-layer gradient alone
is 0.8 MB), so each step faulted in thousands of fresh zeroed pages: on the
2-core machine tftrain is measured on, a third of a worker's CPU time went to
page faults and munmap (BUILD_NOTES.md). Raising the thresholds once, at
start-up, lets freed buffers be reused; one-device MLP training went from
about 24 to 43 thousand examples/s.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 16 << 20  # glibc's ceiling on 64-bit systems is 32 MiB
TRIM_THRESHOLD = 256 << 20
TOP_PAD = 16 << 20


def tune() -> bool:
    """Raises glibc's mmap and trim thresholds; returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (_M_TOP_PAD, TOP_PAD),
        )
    )
