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
  computed with exact rational arithmetic, clipped to max|x| (calib/calibrate/percentile.py).
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
    bins = np.array(counts[:n], dtype=np.int64)  # a copy: the caller's histogram is not touched
    bins[0] = bins[1]
    candidates, divergences = [], []
    for i in range(start_bin, len(bins) + 1):
        space = np.linspace(0, i, num=num_quant_bins + 1)
        digitized = np.digitize(range(i), space) - 1
        digitized[bins[:i] == 0] = -1
        level_counts = np.zeros(num_quant_bins, dtype=np.float64)
        kept = digitized != -1
        np.add.at(level_counts, digitized[kept], bins[:i][kept])
        for level, nonempty in Counter(digitized.tolist()).items():
            if level != -1:
                level_counts[level] /= nonempty
        q = np.where(digitized != -1, level_counts[np.maximum(digitized, 0)], 0.0)
        p = np.array(bins[:i], dtype=np.float64)
        p[-1] += bins[i:].sum()
        candidates.append(i)
        divergences.append(scipy_entropy(p, q))
    return np.array(candidates), np.array(divergences)


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
    need = Fraction(p) / 100 * total  # exact: the float p as given, no rounding
    running = 0
    for k, c in enumerate(counts):
        running += int(c)
        if running >= need:
            return min((k + 1) * w, max_abs)
    return min(len(counts) * w, max_abs)


# ---- mse ---------------------------------------------------------------------------------------------
def _fakequant(t: np.ndarray, s: float) -> np.ndarray:
    return s * np.clip(np.round(t / s), -127, 127)


def mse_cost_ref(counts: np.ndarray, w: float, amax: float) -> float:
    """Expected squared error per value at ``amax``, values uniform within each bin (exact)."""
    counts = np.asarray(counts, dtype=np.float64)
    n = last_nonempty(counts)
    s = amax / 127.0
    edges = np.arange(n + 1, dtype=np.float64) * w
    decisions = (np.arange(127) + 0.5) * s  # where round(t/s) steps up; saturated past 126.5 s
    cuts = np.union1d(edges, decisions[decisions < edges[-1]])
    lo, hi = cuts[:-1], cuts[1:]
    mid = (lo + hi) / 2
    q = _fakequant(mid, s)  # the quantizer is constant on each piece
    piece = ((hi - q) ** 3 - (lo - q) ** 3) / 3.0  # integral of (t - q)^2 over the piece
    b = np.minimum((mid // w).astype(np.int64), n - 1)
    density = counts[b] / w  # uniform within the bin: count per unit length
    return float((density * piece).sum() / counts.sum())


def mse_ref(counts: np.ndarray, w: float, max_abs: float) -> dict:
    """Every candidate amax = k*w (k = 1..n) with its cost; the last minimum wins."""
    n = last_nonempty(counts)
    if max_abs == 0 or n == 0:
        return {"amax": 0.0, "k": 0, "costs": None}
    costs = np.array([mse_cost_ref(counts, w, k * w) for k in range(1, n + 1)])
    k = len(costs) - int(np.argmin(costs[::-1]))
    return {"amax": min(k * w, max_abs), "k": k, "costs": costs}


# ---- minmax ------------------------------------------------------------------------------------------
def minmax_ref(raw: np.ndarray) -> float:
    x = np.asarray(raw, dtype=np.float64).reshape(-1)
    x = x[np.isfinite(x)]
    return float(np.abs(x).max()) if x.size else 0.0
