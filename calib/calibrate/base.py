"""Ranges: what calibration produces and every later stage consumes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Mapping

from calib.errors import RangesError

__all__ = ["TensorRange", "Ranges", "INT8_MAX", "FALLBACK_AMAX"]

INT8_MAX = 127
# amax used when a tensor has no usable range (all zeros, only non-finite values):
# TensorRT needs every scale > 0, and both TensorRT and ONNX Runtime use scale 1.0 there.
FALLBACK_AMAX = float(INT8_MAX)


@dataclass(frozen=True)
class TensorRange:
    """Symmetric INT8 range of one activation tensor: values in [-amax, amax]."""

    amax: float
    method: str
    degenerate: str | None = None  # why the fallback amax was used, if it was

    def __post_init__(self) -> None:
        if not (math.isfinite(self.amax) and self.amax > 0):
            raise RangesError(f"amax must be finite and > 0, got {self.amax} ({self.method})")

    @property
    def scale(self) -> float:
        return self.amax / INT8_MAX


@dataclass
class Ranges(Mapping[str, TensorRange]):
    """Per-tensor ranges from one method (or a per-tensor mix, method="mixed")."""

    method: str
    tensors: dict[str, TensorRange] = field(default_factory=dict)
    model_sha256: str = ""

    def __getitem__(self, name: str) -> TensorRange:
        try:
            return self.tensors[name]
        except KeyError:
            raise RangesError(f"no range for tensor '{name}' (method {self.method})",
                              hint="collect statistics for this model again") from None

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def get(self, name: str, default: TensorRange | None = None) -> TensorRange | None:
        return self.tensors.get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def amax(self) -> dict[str, float]:
        return {k: v.amax for k, v in self.tensors.items()}
