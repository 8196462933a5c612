"""Per-output-channel weight ranges, straight from the weights (no data needed).

Axis by op type: Conv weights [Cout, Cin/g, k...] -> 0; ConvTranspose
[Cin, Cout/g, k...] -> 1; Gemm B is [N, K] with transB=1 -> 0, else [K, N] -> 1;
MatMul with a constant B [..., K, N] -> its last axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from calib.model import Model

__all__ = ["WeightRange", "weight_axis", "weight_ranges", "weight_input_index"]


@dataclass(frozen=True)
class WeightRange:
    node: str
    tensor: str
    axis: int
    amax: np.ndarray  # per channel, float64; zero channels are reported, never scaled by 0
    zero_channels: int

    @property
    def scale(self) -> np.ndarray:
        a = np.where(self.amax > 0, self.amax, 1.0)
        return (a / 127.0).astype(np.float32)


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return a.i
    return default


def weight_input_index(node: onnx.NodeProto) -> int:
    return 1  # Conv/ConvTranspose W, Gemm B, MatMul B


def weight_axis(node: onnx.NodeProto, rank: int) -> int:
    op = node.op_type
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1
    if op == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
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
