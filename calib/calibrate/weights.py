"""Per-output-channel weight ranges, straight from the weights (no data needed).

Axis by op type: Conv weights [Cout, Cin/g, k...] -> 0; ConvTranspose
[Cin, Cout/g, k...] -> 1; Gemm B is [N, K] with transB=1 -> 0, else [K, N] -> 1;
MatMul with a constant B [..., K, N] -> its last axis. ``weight_axis`` is that rule and
``weight_scales`` the one int8 weight scale computation; export (placement and Q/DQ) uses both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from calib.calibrate.base import INT8_MAX
from calib.graph import attr
from calib.model import Model

__all__ = ["WeightRange", "weight_axis", "weight_ranges", "weight_input_index", "weight_scales", "scales_from_amax"]

_TINY_SCALE = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True)
class WeightRange:
    node: str
    tensor: str
    axis: int
    amax: np.ndarray  # per channel, float64; zero channels are reported, never scaled by 0
    zero_channels: int

    @property
    def scale(self) -> np.ndarray:
        return scales_from_amax(self.amax)[0]


def weight_input_index(node: onnx.NodeProto) -> int:
    return 1  # Conv/ConvTranspose W, Gemm B, MatMul B


def weight_axis(node: onnx.NodeProto, rank: int) -> int:
    """Per-output-channel axis of a weight of rank ``rank`` (see the module doc)."""
    op = node.op_type
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1
    if op == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    if op == "MatMul":
        return rank - 1
    raise ValueError(f"no weight axis for op {op}")


def weight_ranges(model: Model) -> dict[str, WeightRange]:
    """Per-channel amax of every Conv/ConvTranspose/Gemm/MatMul whose weight is an initializer."""
    out: dict[str, WeightRange] = {}
    for node in model.weighted_nodes():
        if len(node.input) < 2:
            continue
        w = model.weight(node.input[1])
        if w is None or w.dtype.kind != "f" or w.ndim < 1:
            continue
        if node.op_type == "MatMul" and w.ndim < 2:
            continue
        axis = weight_axis(node, w.ndim)
        other = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w.astype(np.float64)).max(axis=other) if other else np.abs(w.astype(np.float64))
        out[node.name] = WeightRange(node.name, node.input[1], axis, amax, int((amax == 0).sum()))
    return out


def scales_from_amax(amax, floor=None, qmax: int = INT8_MAX) -> tuple[np.ndarray, int]:
    """Symmetric int8 scales ``amax / qmax`` (float32; qmax 127, or 63 for 7-bit weights) and how many channels have amax 0.

    A channel whose amax is 0 gets scale 1.0 (its values are all 0 and stay 0): TensorRT
    and ONNX Runtime both need strictly positive scales; no scale is below the smallest
    normal float32. ``floor`` (a number or one per channel) is a lower bound the float32
    scales keep exactly (e.g. so that an int32 bias cannot overflow, see ``calib.export.qdq``).
    """
    amax = np.asarray(amax, dtype=np.float64).reshape(-1)
    zero = amax <= 0
    scales = np.maximum(np.where(zero, 1.0, amax / qmax), _TINY_SCALE)
    if floor is None:
        return scales.astype(np.float32), int(zero.sum())
    lo = np.broadcast_to(np.asarray(floor, dtype=np.float64), scales.shape)
    scales = np.maximum(scales, lo)
    out = scales.astype(np.float32)
    short = out.astype(np.float64) < lo  # float32 rounding fell below the floor: one ulp up
    out[short] = np.nextafter(out[short], np.float32(np.inf))
    return out, int(zero.sum())


def weight_scales(w: np.ndarray, axis: int | None, amax: np.ndarray | None = None,
                  floor=None, qmax: int = INT8_MAX) -> tuple[np.ndarray, int]:
    """Int8 scales of ``w`` along ``axis`` (None: one scale), from ``amax`` if given; (scales, zero channels)."""
    if amax is None:
        a = np.abs(w.astype(np.float64))
        amax = np.array([a.max()]) if axis is None else a.max(axis=tuple(d for d in range(w.ndim) if d != axis))
    return scales_from_amax(amax, floor, qmax)
