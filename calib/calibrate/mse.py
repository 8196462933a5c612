"""MSE: the amax minimising the expected squared quantization error on the histogram.

The search runs on the 2,048 linear bins over [0, max|x|] that entropy uses
(``TensorHistogram.linear_abs_counts``), so the candidates scale with the data.
Values are taken as uniform within each bin. For a candidate amax
(every bin edge k*w, k = 1..n), the symmetric int8 quantizer with step
s = amax/127 maps t >= 0 to s*min(round(t/s), 127); the expected error of a bin
[l, r) is (G(r) - G(l)) / (r - l) with G(x) = integral_0^x (t - Q(t))^2 dt, which
has a closed form: for x <= 126.5 s, G = s^3 (m/12 + f^3/3) with m = floor(x/s +
1/2), f = x/s - m (rounding noise, period s); past that, the clipping term
((x - 127 s)^3 + (s/2)^3)/3 is added. The sum over bins weighted by counts is the
expected MSE; the smallest wins (ties to the larger amax). Exact zeros and small
values are therefore charged only the rounding error they really get, unlike the
s^2/12 rule of thumb.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from calib._kernels import mse_costs_kernel
from calib.stats import TensorHistogram

__all__ = ["Mse", "mse_amax", "mse_costs", "quant_error_integral"]

def quant_error_integral(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """G(x) = integral_0^x (t - Q_s(t))^2 dt for the 127-level symmetric quantizer with step s."""
    y = x / s
    yc = np.minimum(y, 126.5)
    m = np.floor(yc + 0.5)
    f = yc - m
    g = m / 12.0 + f ** 3 / 3.0
    over = np.maximum(y - 127.0, -0.5)
    g = g + np.where(y > 126.5, (over ** 3 + 0.125) / 3.0, 0.0)
    return g * s ** 3


def mse_costs(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expected MSE (in units of bin_width**2 per value) of every candidate k = 1..n."""
    counts = np.asarray(counts, dtype=np.float64)
    nz = np.flatnonzero(counts)
    n = int(nz[-1]) + 1 if nz.size else 1
    b = np.ascontiguousarray(counts[:n])
    cand = np.arange(1, n + 1)
    return cand, mse_costs_kernel(b) / max(b.sum(), 1.0)


def mse_amax(h: TensorHistogram) -> float:
    counts, width = h.linear_abs_counts()
    if counts.sum() == 0:
        return 0.0
    cand, costs = mse_costs(counts)
    best = costs.min()
    k = int(cand[np.flatnonzero(costs <= best * (1 + 1e-12))[-1]])
    return min(k * width, h.max_abs)


@dataclass(frozen=True)
class Mse:
    name: ClassVar[str] = "mse"

    def amax(self, h: TensorHistogram) -> float:
        return mse_amax(h)

    @property
    def label(self) -> str:
        return self.name
