"""Compiled inner loops (numba): one pass per batch folds values into a histogram.

``fold`` bins |x| at the histogram's current power-of-two width and, when a
value falls past the last bin, halves the resolution in place (adding
neighbouring bins) until it fits. Halving commutes with binning exactly, so the
result equals binning every value at the final width (see calib.stats).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["fold", "fold_finite", "downsample"]

_LOG2_BINS = 15  # keep equal to calib.stats.LOG2_BINS
_NUM_BINS = 1 << _LOG2_BINS
_MIN_EXP = -126


@njit(nogil=True, cache=True)
def _halve(h, times):
    n = h.shape[0]
    for _ in range(times):
        for k in range(n // 2):
            h[k] = h[2 * k] + h[2 * k + 1]
        for k in range(n // 2, n):
            h[k] = 0


@njit(nogil=True, cache=True)
def downsample(h, times):
    """Merge bins of ``h`` in place as if the width had doubled ``times`` times."""
    n = h.shape[0]
    if times <= 0:
        return
    if (1 << min(times, 62)) >= n:
        total = 0
        for k in range(n):
            total += h[k]
            h[k] = 0
        h[0] = total
        return
    _halve(h, times)


@njit(nogil=True, cache=True)
def _exp_for(a):
    if a <= 0.0:
        return _MIN_EXP
    m, ex = math.frexp(a)
    return max(_MIN_EXP, ex - _LOG2_BINS)


@njit(nogil=True, cache=True)
def fold(x, pos, neg, exp, has_data):
    """Fold the 1-D array ``x`` into ``pos``/``neg``; returns (exp, min, max, n_nonfinite)."""
    mn = np.inf
    mx = -np.inf
    nnf = 0
    inv = 2.0 ** (-exp)
    for i in range(x.shape[0]):
        v = np.float64(x[i])
        if not math.isfinite(v):
            nnf += 1
            continue
        if v < mn:
            mn = v
        if v > mx:
            mx = v
        a = abs(v)
        t = a * inv
        if t >= _NUM_BINS:
            e_new = _exp_for(a)
            if has_data:
                downsample(pos, e_new - exp)
                downsample(neg, e_new - exp)
            exp = e_new
            inv = 2.0 ** (-exp)
            t = a * inv
        has_data = True
        k = np.int64(t)
        if v < 0.0:
            neg[k] += 1
        else:
            pos[k] += 1
    return exp, mn, mx, nnf


@njit(nogil=True, cache=True)
def fold_finite(x, pos, neg, inv, top):
    """Bin the 1-D array ``x`` into ``pos``/``neg`` at a fixed width 1/``inv`` (a power of two).

    The fast path: every value must be finite and |x| * inv < ``top`` <= NUM_BINS (the caller has
    already grown the grid to the batch's max|x| and passes the bins it reaches). Branch-free: one
    scatter into a scratch histogram of 2 * ``top`` (negative values in the upper half), then added
    into ``pos``/``neg``. With a power-of-two ``inv`` the product is exact (a result below the
    smallest normal float is < 1, so it lands in bin 0 whatever its rounding), in float32 as in float64.
    """
    h = np.zeros(2 * top, np.int64)
    for i in range(x.shape[0]):
        v = x[i]
        k = np.int64(abs(v) * inv) + top * np.int64(v < 0)
        h[k] += 1
    for k in range(top):
        pos[k] += h[k]
        neg[k] += h[top + k]


@njit(nogil=True, cache=True)
def _g(x, s):
    """Integral of the squared error of the 127-level quantizer with step s, from 0 to x."""
    y = x / s
    if y <= 126.5:
        m = math.floor(y + 0.5)
        f = y - m
        return (m / 12.0 + f * f * f / 3.0) * s * s * s
    over = y - 127.0
    return ((127.0 / 12.0 - 0.125 / 3.0) + (over * over * over + 0.125) / 3.0) * s * s * s


@njit(nogil=True, cache=True)
def mse_costs_kernel(b):
    """Sum over bins of count * integral of the squared error, for every candidate amax k = 1..n
    (bin units). Bins wholly in the saturated region use suffix sums; the rest use _g differences."""
    n = b.shape[0]
    s0 = np.zeros(n + 1)
    s1 = np.zeros(n + 1)
    s2 = np.zeros(n + 1)
    for j in range(n - 1, -1, -1):
        s0[j] = s0[j + 1] + b[j]
        s1[j] = s1[j + 1] + b[j] * j
        s2[j] = s2[j + 1] + b[j] * j * j
    costs = np.empty(n)
    for kk in range(1, n + 1):
        k = float(kk)
        s = k / 127.0
        j0 = int(math.ceil(k - 0.5 * s))
        if j0 > n:
            j0 = n
        total = 0.0
        g_prev = 0.0
        for j in range(j0):
            g_next = _g(j + 1.0, s)
            if b[j] != 0.0:
                total += b[j] * (g_next - g_prev)
            g_prev = g_next
        # bins j >= j0 lie wholly where values saturate to k: sum b_j ((j-k)^2 + (j-k) + 1/3)
        total += s2[j0] - 2.0 * k * s1[j0] + k * k * s0[j0] + s1[j0] - k * s0[j0] + s0[j0] / 3.0
        costs[kk - 1] = total
    return costs


@njit(nogil=True, cache=True)
def entropy_kl_kernel(bins, num_quant_bins):
    """KL(P || Q) of every candidate i = num_quant_bins..n (see calib.calibrate.entropy for the formula).

    ``bins`` is float64 with bins[0] already replaced by bins[1]; returns kl[i - num_quant_bins].
    """
    n = bins.shape[0]
    nq = num_quant_bins
    c = np.zeros(n + 1)
    m = np.zeros(n + 1)
    plogp = np.zeros(n + 1)
    for j in range(n):
        b = bins[j]
        c[j + 1] = c[j] + b
        m[j + 1] = m[j] + (1.0 if b > 0 else 0.0)
        plogp[j + 1] = plogp[j] + (b * math.log(b) if b > 0 else 0.0)
    total = c[n]
    kl = np.empty(n - nq + 1)
    for i in range(nq, n + 1):
        level = 0.0
        s_last = 0.0
        m_last = 0.0
        start = 0
        for k in range(nq):
            stop = ((k + 1) * i + nq - 1) // nq  # ceil((k + 1) i / nq)
            s = c[stop] - c[start]
            mm = m[stop] - m[start]
            if s > 0:
                level += s * math.log(s / mm)
            s_last = s
            m_last = mm
            start = stop
        ci = c[i]
        outliers = total - ci
        last = bins[i - 1]
        if outliers > 0 and last == 0:
            kl[i - nq] = np.inf
            continue
        p_last = last + outliers
        pl = plogp[i - 1] + (p_last * math.log(p_last) if p_last > 0 else 0.0)
        out_term = 0.0
        if outliers > 0:
            q_last = s_last / m_last if m_last > 0 else 0.0
            if q_last > 0:
                out_term = outliers * math.log(q_last)
        if ci > 0:
            kl[i - nq] = (pl - level - out_term) / total + math.log(ci / total)
        else:
            kl[i - nq] = np.inf
    return kl
