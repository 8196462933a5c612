"""MinMax: amax = max(|min|, |max|) over every finite value (TensorRT's IInt8MinMaxCalibrator range)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from calib.stats import TensorHistogram

__all__ = ["MinMax", "minmax_amax"]


def minmax_amax(h: TensorHistogram) -> float:
    return h.max_abs


@dataclass(frozen=True)
class MinMax:
    name: ClassVar[str] = "minmax"

    def amax(self, h: TensorHistogram) -> float:
        return minmax_amax(h)

    @property
    def label(self) -> str:
        return self.name
