"""Percentile: the smallest bin edge below which at least p % of |x| lies.

pytorch-quantization returns the *lower* edge of the bin where the CDF crosses
p; calib returns that bin's *upper* edge so that at least p % of the values are
within [-amax, amax] by construction, then clips to max|x|.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import math
from fractions import Fraction

import numpy as np

from calib.errors import RangesError
from calib.stats import TensorHistogram

__all__ = ["Percentile", "percentile_amax"]


def percentile_amax(h: TensorHistogram, p: float = 99.99) -> float:
    counts = h.abs_counts()
    total = int(counts.sum())
    if total == 0:
        return 0.0
    cum = np.cumsum(counts)
    # first bin whose cumulative count reaches p % of the total, in exact arithmetic with p read as the
    # decimal it was written as (p / 100.0 * total in floats gives 999.0000000000001 for 99.9 % of 1000,
    # which would demand all 1000 values)
    need = math.ceil(Fraction(repr(float(p))) * total / 100)
    k = int(np.searchsorted(cum, need, side="left"))
    k = min(k, len(counts) - 1)
    return min((k + 1) * h.bin_width, h.max_abs)


@dataclass(frozen=True)
class Percentile:
    p: float = 99.99
    name: ClassVar[str] = "percentile"

    def __post_init__(self) -> None:
        if not (0.0 < self.p <= 100.0):
            raise RangesError(f"percentile must be in (0, 100], got {self.p}")

    def amax(self, h: TensorHistogram) -> float:
        return percentile_amax(h, self.p)

    @property
    def label(self) -> str:
        return self.name if self.p == 99.99 else f"{self.name}:{self.p:g}"
