"""Entropy: TensorRT's KL-divergence threshold search, vectorized.

Follows pytorch-quantization's ``_compute_amax_entropy`` (NVIDIA's reference for
TensorRT entropy calibration, see TENSORRT.md section 1) on its histogram: 2,048
linear bins over [0, max|x|], which ``TensorHistogram.linear_abs_counts`` re-bins
from calib's exact power-of-two grid (32,768 fine bins, so 8-16 per linear bin).
Hence amax scales with the data by any factor and matches pytorch-quantization
run on the raw values (to within the rare case where a value's position inside
a fine bin moves it across a linear edge):

* ``bins[0] = bins[1]`` (suppress the zero spike);
* for every candidate i in [128, n] (n = last non-empty bin + 1, i.e. 2,048
  unless the top bins are empty after re-binning): P = bins[:i] with the outliers sum(bins[i:]) added to
  P[i-1]; Q merges bins[:i] into 128 levels (source bin j -> level
  floor(128 j / i)) and spreads each level's count evenly over its non-empty
  source bins; KL(P || Q) with both normalised (natural log);
* the last i of minimal divergence wins; amax = i * max|x| / 2048 (the upper
  edge), clipped to max|x|.

Instead of one O(i) pass per candidate this computes every candidate's KL from
prefix sums (O(128) per candidate, compiled: calib._kernels.entropy_kl_kernel):
KL_i = (1/T) [sum_j P_j ln P_j - sum_k S_k ln(S_k/M_k) - O_i ln q_{i-1}] + ln(C_i/T),
with T the total, C_i = sum(bins[:i]), O_i = T - C_i, S_k and M_k the count and
number of non-empty bins of level k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from calib._kernels import entropy_kl_kernel
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
    bins = np.ascontiguousarray(bins[:n])
    bins[0] = bins[1]
    return np.arange(num_quant_bins, n + 1), entropy_kl_kernel(bins, num_quant_bins)


def entropy_amax(h: TensorHistogram, num_quant_bins: int = 128) -> float:
    counts, width = h.linear_abs_counts()
    if counts.sum() == 0:
        return 0.0
    cand, kl = entropy_divergences(counts, num_quant_bins)
    finite = np.isfinite(kl)
    best = kl[finite].min()
    tol = _REL_TIE * max(1.0, abs(best))
    i = int(cand[np.flatnonzero(finite & (kl <= best + tol))[-1]])
    return min(i * width, h.max_abs)


@dataclass(frozen=True)
class Entropy:
    num_quant_bins: int = 128
    name: ClassVar[str] = "entropy"

    def amax(self, h: TensorHistogram) -> float:
        return entropy_amax(h, self.num_quant_bins)

    @property
    def label(self) -> str:
        return self.name
