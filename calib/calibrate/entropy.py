"""Entropy: TensorRT's KL-divergence threshold search, vectorized.

Follows pytorch-quantization's ``_compute_amax_entropy`` (NVIDIA's reference for
TensorRT entropy calibration, see TENSORRT.md section 1) on the |x| histogram:

* ``bins[0] = bins[1]`` (suppress the zero spike);
* for every candidate i in [128, n] (n = last non-empty bin + 1; pytorch-
  quantization's first-batch range ends at max|x|, so its last bin is the
  last non-empty one): P = bins[:i] with the outliers sum(bins[i:]) added to
  P[i-1]; Q merges bins[:i] into 128 levels (source bin j -> level
  floor(128 j / i)) and spreads each level's count evenly over its non-empty
  source bins; KL(P || Q) with both normalised (natural log);
* the last i of minimal divergence wins; amax = i * bin_width (the upper edge),
  clipped to max|x|.

Instead of one O(i) pass per candidate this computes every candidate's KL from
prefix sums (O(128) per candidate):
KL_i = (1/T) [sum_j P_j ln P_j - sum_k S_k ln(S_k/M_k) - O_i ln q_{i-1}] + ln(C_i/T),
with T the total, C_i = sum(bins[:i]), O_i = T - C_i, S_k and M_k the count and
number of non-empty bins of level k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from calib.stats import TensorHistogram

__all__ = ["Entropy", "entropy_amax", "entropy_divergences"]

_REL_TIE = 1e-12


def entropy_divergences(counts: np.ndarray, num_quant_bins: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """KL divergence of every candidate i in [num_quant_bins, n]; returns (candidates, kl)."""
    bins = np.asarray(counts, dtype=np.float64).copy()
    nz = np.flatnonzero(bins)
    n = int(nz[-1]) + 1 if nz.size else 0
    if n <= num_quant_bins:
        return np.array([max(n, 1)]), np.zeros(1)
    bins = bins[:n]
    bins[0] = bins[1]
    total = bins.sum()
    c = np.concatenate([[0.0], np.cumsum(bins)])  # C[j] = sum(bins[:j])
    m = np.concatenate([[0], np.cumsum(bins > 0)]).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        blogb = np.where(bins > 0, bins * np.log(np.where(bins > 0, bins, 1.0)), 0.0)
    plogp_prefix = np.concatenate([[0.0], np.cumsum(blogb)])

    cand = np.arange(num_quant_bins, n + 1)
    k = np.arange(num_quant_bins + 1)
    starts = (k[None, :] * cand[:, None] + num_quant_bins - 1) // num_quant_bins  # ceil(k i / nq)
    s = c[starts[:, 1:]] - c[starts[:, :-1]]  # level counts
    mm = m[starts[:, 1:]] - m[starts[:, :-1]]  # non-empty bins per level
    with np.errstate(divide="ignore", invalid="ignore"):
        level_term = np.where(s > 0, s * np.log(np.where(s > 0, s, 1.0) / np.where(mm > 0, mm, 1.0)), 0.0).sum(1)
    ci = c[cand]
    outliers = total - ci
    last = bins[cand - 1]
    p_last = last + outliers
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = plogp_prefix[cand - 1] + np.where(p_last > 0, p_last * np.log(np.where(p_last > 0, p_last, 1.0)), 0)
        q_last = np.where(mm[:, -1] > 0, s[:, -1] / np.where(mm[:, -1] > 0, mm[:, -1], 1.0), 0.0)
        out_term = np.where(outliers > 0, outliers * np.log(np.where(q_last > 0, q_last, 1.0)), 0.0)
        kl = (plogp - level_term - out_term) / total + np.log(ci / total)
    kl = np.where((outliers > 0) & (last == 0), np.inf, kl)
    return cand, kl


def entropy_amax(h: TensorHistogram, num_quant_bins: int = 128) -> float:
    counts = h.abs_counts()
    if counts.sum() == 0:
        return 0.0
    cand, kl = entropy_divergences(counts, num_quant_bins)
    finite = np.isfinite(kl)
    best = kl[finite].min()
    tol = _REL_TIE * max(1.0, abs(best))
    i = int(cand[np.flatnonzero(finite & (kl <= best + tol))[-1]])
    return min(i * h.bin_width, h.max_abs)


@dataclass(frozen=True)
class Entropy:
    num_quant_bins: int = 128
    name: ClassVar[str] = "entropy"

    def amax(self, h: TensorHistogram) -> float:
        return entropy_amax(h, self.num_quant_bins)

    @property
    def label(self) -> str:
        return self.name
