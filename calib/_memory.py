"""Keep peak memory flat over long streams of large, short-lived arrays.

glibc raises its mmap threshold each time a large mmapped block is freed (up to
32 MiB), after which batch-sized arrays (ONNX Runtime outputs, stacked inputs)
come from the heap and fragment it: resident memory then creeps up with the number
of batches. Pinning the threshold at 1 MiB keeps every large array in its own
mapping, returned to the system when freed. Measured on the demo CNN
(bench/results/collect.md): peak RSS 1170 -> 1372 MiB from 100 to 600 samples
without it, 1134 -> 1143 MiB with it.

This is a process-wide allocator setting (it only disables glibc's dynamic
threshold), so the library never makes it: the ``calib`` command line applies it
for its own process (``calib.cli``), and a program embedding calib may call
``steady_malloc()`` itself. Applied once, on Linux with glibc; a no-op elsewhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["steady_malloc"]

_M_MMAP_THRESHOLD = -3
_done = False


def steady_malloc(threshold_bytes: int = 1 << 20) -> bool:
    """Pin glibc's mmap threshold (once per process); returns True if it was applied."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _done = bool(mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))
    return _done
