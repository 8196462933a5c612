"""pytorch-quantization's entropy histogram and threshold, from raw values; and a slow re-binning.

* ``pq_histogram(raw)``: ``np.histogram(|x|, 2048, (0, max|x|))`` over the finite values, as
  pytorch-quantization's ``HistogramCalibrator.collect`` bins the first batch (range fixed to
  [0, max|x|], TENSORRT.md section 1).
* ``pq_entropy_amax(raw)``: that histogram through ``_compute_amax_entropy`` (the plain loop in
  reference/calibrators.py): amax = edges[best i].
* ``rebin_linear_ref(counts, w, max_abs, num_bins)``: a power-of-two histogram (bin j = [j w, (j+1) w))
  spread onto ``num_bins`` linear bins over [0, max_abs], each fine bin's count taken as uniform over
  it (the last occupied one over [its lower edge, max_abs]), by summing overlaps bin by bin.
"""

from __future__ import annotations

import numpy as np
from reference import calibrators as ref

PQ_BINS = 2048


def _finite_abs(raw) -> np.ndarray:
    x = np.abs(np.asarray(raw, dtype=np.float64).reshape(-1))
    return x[np.isfinite(x)]


def pq_histogram(raw) -> tuple[np.ndarray, float]:
    a = _finite_abs(raw)
    top = float(a.max())
    counts, edges = np.histogram(a, bins=PQ_BINS, range=(0.0, top))
    return counts.astype(np.int64), float(edges[1] - edges[0])


def pq_entropy_amax(raw) -> float:
    counts, w = pq_histogram(raw)
    return ref.entropy_ref(counts, w, float(_finite_abs(raw).max()))["amax"]


def rebin_linear_ref(counts, w: float, max_abs: float, num_bins: int = PQ_BINS) -> tuple[np.ndarray, float]:
    counts = np.asarray(counts)
    n = ref.last_nonempty(counts)
    width = max_abs / num_bins
    out = np.zeros(num_bins)
    for j in range(n):
        c = float(counts[j])
        if c == 0:
            continue
        lo = j * w
        hi = max_abs if j == n - 1 else (j + 1) * w
        if hi <= lo:  # every value of this bin is max_abs itself: the last linear bin
            out[-1] += c
            continue
        k_lo = int(lo // width)
        for k in range(k_lo, num_bins):
            a, b = max(lo, k * width), min(hi, (k + 1) * width)
            if k == num_bins - 1:
                b = hi  # the last linear bin ends at max_abs
            if b > a:
                out[k] += c * (b - a) / (hi - lo)
            if (k + 1) * width >= hi:
                break
    return out, width
