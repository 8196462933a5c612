"""Compiled inner loop (numba): one pass over an FP32/INT8 tensor pair per sample.

Reading both float32 arrays once and accumulating in float64 is about ten times
faster than numpy's convert-then-reduce passes, which matters because
comparison touches every value of every compared tensor.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["pair_sums", "N_SUMS"]

# columns of pair_sums' result
DOT, AA, BB, ERR2, ABS_ERR, MAX_ABS_ERR, NONFINITE = range(7)
N_SUMS = 7


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _pair_sums_fast(a, b, out):
    n, m = a.shape
    for i in range(n):
        dot = 0.0
        aa = 0.0
        bb = 0.0
        e2 = 0.0
        ae = 0.0
        mx = 0.0
        for j in range(m):
            x = np.float64(a[i, j])
            y = np.float64(b[i, j])
            d = y - x
            dot += x * y
            aa += x * x
            bb += y * y
            e2 += d * d
            ad = abs(d)
            ae += ad
            mx = max(mx, ad)
        out[i, 0] = dot
        out[i, 1] = aa
        out[i, 2] = bb
        out[i, 3] = e2
        out[i, 4] = ae
        out[i, 5] = mx
        out[i, 6] = 0


@njit(nogil=True, cache=True)
def _pair_sums(a, b, out):
    n, m = a.shape
    for i in range(n):
        dot = 0.0
        aa = 0.0
        bb = 0.0
        e2 = 0.0
        ae = 0.0
        mx = 0.0
        bad = 0
        for j in range(m):
            x = np.float64(a[i, j])
            y = np.float64(b[i, j])
            if not (math.isfinite(x) and math.isfinite(y)):
                bad += 1
                continue
            d = y - x
            dot += x * y
            aa += x * x
            bb += y * y
            e2 += d * d
            ad = abs(d)
            ae += ad
            if ad > mx:
                mx = ad
        out[i, 0] = dot
        out[i, 1] = aa
        out[i, 2] = bb
        out[i, 3] = e2
        out[i, 4] = ae
        out[i, 5] = mx
        out[i, 6] = bad


def pair_sums(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row float64 sums of two (samples, values) arrays: columns DOT .. NONFINITE."""
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float32)
    if b.dtype != a.dtype:
        b = b.astype(a.dtype)
    a = np.ascontiguousarray(a)
    b = np.ascontiguousarray(b)
    out = np.empty((a.shape[0], N_SUMS), dtype=np.float64)
    _pair_sums_fast(a, b, out)
    if not np.isfinite(out).all():  # rare: redo with per-value checks, leaving non-finite values out
        _pair_sums(a, b, out)
    return out
