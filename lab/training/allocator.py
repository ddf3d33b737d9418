"""Keep freed activation memory in the process, so that each training step reuses it instead of asking
the kernel for fresh pages.

PyTorch's CPU tensors come from the C library's malloc. glibc serves every allocation above 128 KiB
(adjusted upwards as blocks are freed, never beyond 32 MiB) with its own `mmap` and returns it with
`munmap` on free, and it gives the top of its heap back once 128 KiB of it are free. A training step
allocates and frees the same activations every time (the Nanda et al. setup: (3,830, 512) floats,
7.8 MB, several times a step), so every step page-faults them in again and the kernel zeroes every page.
PyTorch's CPU tuning guide recommends jemalloc or tcmalloc for this; `mallopt` gets the same effect from
glibc itself, with nothing to install: blocks of up to 32 MiB come from the heap and go back to it,
and up to 1 GiB of free heap is kept. Measured on the Nanda step (one thread, separate processes, the
other core busy): 812-1,313 minor page faults per step -> 114-192, and the step 1-4% faster (74.7 -> 71.8 ms,
80.8 -> 80.0 ms); a 64-member small sweep's step, 3-13% (two pairs of runs). The price: a process keeps
memory it freed, up to its peak, which training reaches every step anyway.

Only glibc has `mallopt`; elsewhere (macOS, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit machines
TRIM_THRESHOLD_BYTES = 1 << 30

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds as above, once per process. True if they are in force."""
    global _applied
    if _applied is None:
        _applied = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):  # not glibc
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return _applied
