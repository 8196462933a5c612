"""Slow, obvious calibrators written from the published descriptions (not from calib's code).

Inputs are an |x| histogram: ``counts`` (bin k = [k*w, (k+1)*w)), the bin width ``w`` and, where a
method clips to the data, ``max_abs``. calib's fast code must agree with these.

* entropy: pytorch-quantization's ``_compute_amax_entropy`` loop, as TENSORRT.md section 1
  describes it: bins[0] = bins[1]; for each candidate i, P = bins[:i] with the outliers added to its
  last bin, Q from ``np.digitize`` into 128 levels and a ``Counter`` of the non-empty source bins,
  ``scipy.stats.entropy(P, Q)``; the LAST argmin wins; amax = upper edge i*w. Candidates run over
  i in [128, n] with n = last non-empty bin + 1 (pytorch-quantization's first-batch histogram ends at
  max|x|, so its last bin is the last non-empty one; see calib/calibrate/entropy.py).
* percentile: the upper edge of the first bin where at least p % of the values lie at or below it,
  computed with exact rational arithmetic on p as the decimal it was written as, clipped to max|x| (calib/calibrate/percentile.py).
* mse: for every candidate amax = k*w, the expected squared error of the symmetric int8
  fake-quantizer x -> s*clip(round(x/s), -127, 127), s = amax/127, for values uniform within each
  bin, integrated exactly: each bin is cut at the quantizer's decision points (m + 1/2)*s, and on
  each piece (t - q)^2 with a constant q is integrated in closed form.
* minmax: max|x| over the finite raw values.
"""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import numpy as np
from scipy.stats import entropy as scipy_entropy


def last_nonempty(counts: np.ndarray) -> int:
    nz = np.flatnonzero(np.asarray(counts))
    return int(nz[-1]) + 1 if nz.size else 0


# ---- entropy ---------------------------------------------------------------------------------------
def entropy_divergences_ref(counts: np.ndarray, num_quant_bins: int = 128, start_bin: int = 128):
    """(candidates, divergences) of pytorch-quantization's KL loop on counts[:n]."""
    n = last_nonempty(counts)
    # a copy (the caller's histogram is not touched); float64: re-binned counts are fractional, and for
    # integer counts float64 is exact (pytorch-quantization casts its integer counts to int64)
    bins = np.array(counts[:n], dtype=np.float64)
    bins[0] = bins[1]
    candidates = list(range(start_bin, len(bins) + 1))
    # one row per candidate, zero-padded to n bins (a 0 in both P and Q adds 0 to the KL sum), so that
    # scipy.stats.entropy runs once over all rows instead of once per candidate (it is slow to call)
    p_rows = np.zeros((len(candidates), n))
    q_rows = np.zeros((len(candidates), n))
    for row, i in enumerate(candidates):
        space = np.linspace(0, i, num=num_quant_bins + 1)
        digitized = np.digitize(range(i), space) - 1
        digitized[bins[:i] == 0] = -1
        level_counts = np.zeros(num_quant_bins, dtype=np.float64)
        kept = digitized != -1
        np.add.at(level_counts, digitized[kept], bins[:i][kept])
        for level, nonempty in Counter(digitized.tolist()).items():
            if level != -1:
                level_counts[level] /= nonempty
        q_rows[row, :i] = np.where(kept, level_counts[np.maximum(digitized, 0)], 0.0)
        p_rows[row, :i] = bins[:i]
        p_rows[row, i - 1] += bins[i:].sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        kl = scipy_entropy(p_rows, q_rows, axis=1)
    # A threshold below all the data leaves Q empty; scipy then returns NaN (0/0 when normalising)
    # and np.argmin would pick that NaN. Such a threshold keeps nothing: count it as +inf.
    kl[q_rows.sum(axis=1) == 0] = np.inf
    return np.array(candidates), kl


def entropy_ref(counts: np.ndarray, w: float, max_abs: float, num_quant_bins: int = 128) -> dict:
    """amax, chosen candidate and the whole divergence curve (None curve if there is no search)."""
    n = last_nonempty(counts)
    if max_abs == 0 or n == 0:
        return {"amax": 0.0, "i": 0, "candidates": None, "kl": None}
    if n <= num_quant_bins:  # fewer bins than levels: nothing to search, the full range is kept
        return {"amax": min(n * w, max_abs), "i": n, "candidates": None, "kl": None}
    cand, kl = entropy_divergences_ref(counts, num_quant_bins)
    last_argmin = len(kl) - 1 - int(np.argmin(kl[::-1]))
    i = int(cand[last_argmin])
    return {"amax": min(i * w, max_abs), "i": i, "candidates": cand, "kl": kl}


# ---- percentile ------------------------------------------------------------------------------------
def percentile_ref(counts: np.ndarray, w: float, max_abs: float, p: float = 99.99) -> float:
    total = int(np.sum(counts))
    if total == 0 or max_abs == 0:
        return 0.0
    need = Fraction(repr(p)) / 100 * total  # exact, with p the decimal as written (99.9 = 999/10)
    running = 0
    for k, c in enumerate(counts):
        running += int(c)
        if running >= need:
            return min((k + 1) * w, max_abs)
    return min(len(counts) * w, max_abs)


# ---- mse ---------------------------------------------------------------------------------------------
def _fakequant(t: np.ndarray, s: float) -> np.ndarray:
    return s * np.clip(np.round(t / s), -127, 127)


def mse_cost_ref(counts: np.ndarray, w: float, amax) -> np.ndarray | float:
    """Expected squared error per value at ``amax`` (a number or an array of them), values uniform
    within each bin, integrated exactly piece by piece."""
    counts = np.asarray(counts, dtype=np.float64)
    n = last_nonempty(counts)
    amaxes = np.atleast_1d(np.asarray(amax, dtype=np.float64))
    s = amaxes[:, None] / 127.0  # one row per candidate
    edges = np.broadcast_to(np.arange(n + 1, dtype=np.float64) * w, (len(amaxes), n + 1))
    decisions = (np.arange(127) + 0.5) * s  # where round(t/s) steps up; saturated past 126.5 s
    decisions = np.minimum(decisions, edges[:, -1:])  # cuts past the data collapse onto its end
    cuts = np.sort(np.concatenate([edges, decisions], axis=1), axis=1)
    lo, hi = cuts[:, :-1], cuts[:, 1:]  # pieces of zero length add nothing
    mid = (lo + hi) / 2
    q = _fakequant(mid, s)  # the quantizer is constant on each piece
    piece = ((hi - q) ** 3 - (lo - q) ** 3) / 3.0  # integral of (t - q)^2 over the piece
    b = np.minimum((mid // w).astype(np.int64), n - 1)
    density = counts[b] / w  # uniform within the bin: count per unit length
    cost = (density * piece).sum(axis=1) / counts.sum()
    return cost if np.ndim(amax) else float(cost[0])


def mse_ref(counts: np.ndarray, w: float, max_abs: float) -> dict:
    """Every candidate amax = k*w (k = 1..n) with its cost; the last minimum wins."""
    n = last_nonempty(counts)
    if max_abs == 0 or n == 0:
        return {"amax": 0.0, "k": 0, "costs": None}
    ks = np.arange(1, n + 1)
    costs = np.concatenate([mse_cost_ref(counts, w, ks[i:i + 128] * w) for i in range(0, n, 128)])
    k = len(costs) - int(np.argmin(costs[::-1]))
    return {"amax": min(k * w, max_abs), "k": k, "costs": costs}


# ---- minmax ------------------------------------------------------------------------------------------
def minmax_ref(raw: np.ndarray) -> float:
    x = np.asarray(raw, dtype=np.float64).reshape(-1)
    x = x[np.isfinite(x)]
    return float(np.abs(x).max()) if x.size else 0.0
