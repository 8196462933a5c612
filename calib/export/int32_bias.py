"""Int32 biases for the ONNX Runtime target: the fused int8 kernels then compute what the spec evaluation does.

ONNX Runtime fuses ``DQ(x), DQ(w), b -> Conv/Gemm -> Q`` into an integer kernel that adds the bias to the
int32 accumulator: a float bias is rounded to int32 (scale ``s_x s_w``) first. The spec evaluation (DQ ->
float Conv -> Q) adds the float bias, so the two differ wherever the output lies within that rounding of a
tie: on a ResNet (resnet_fmnist, ORT target) about 1 % of a conv's outputs moved by one step, relative error
up to 4e-3 per conv and 1e-2 at the logits, enough to flip one top-1 in 200. ``int32_biases`` writes each
such bias the way ONNX Runtime's own quantizer does, ``DQ(round(b / (s_x s_w)), scale s_x s_w, zero point
0)``: the fused kernel computes what it computed before, bit for bit, and the spec evaluation now adds the
same integer (what still differs is the spec's own float32 accumulation; resnet_fmnist's logits: relative
error 1e-2 -> 8e-4; tests/test_int32_bias.py). The rounding moves each bias by at most ``s_x s_w / 2``.
``calib.export.qdq.bias_floors`` already keeps ``|b| / (s_x s_w)`` below 2^30. TensorRT takes float
biases, so this is for the ORT target only (``placement = "ort"``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["int32_biases", "BIAS_OPS"]

BIAS_OPS = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}  # op -> index of the bias input
INT32_MAX = 2**31 - 1


def _scale(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    if len(dq.input) < 2 or dq.input[1] not in inits:
        return None
    return numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)


def _bias_scale(node: onnx.NodeProto, producers, inits) -> np.ndarray | None:
    """``s_x * s_w`` (float32; one per output channel, or one) when both inputs come from DQ, else None.
    Per-channel weight scales are per output channel for Conv (axis 0), ConvTranspose (axis 1) and Gemm
    (the axis of B's output dimension), so they line up with the bias."""
    dqs = [producers.get(t) for t in node.input[:2]]
    if any(d is None or d.op_type != "DequantizeLinear" for d in dqs):
        return None
    sx, sw = _scale(dqs[0], inits), _scale(dqs[1], inits)
    if sx is None or sw is None or sx.size != 1:
        return None
    return (sx.reshape(()) * sw.reshape(-1)).astype(np.float32)


def int32_biases(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``proto`` whose fusable Conv/ConvTranspose/Gemm float biases are int32 behind a DQ; the
    nodes changed. A bias that is not a 1-D float initializer, or whose int32 value would overflow, stays."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    readers: dict[str, int] = {}
    for n in g.node:
        for t in n.input:
            readers[t] = readers.get(t, 0) + 1
    changed, new_nodes = [], []
    for node in g.node:
        k = BIAS_OPS.get(node.op_type)
        if k is None or len(node.input) <= k or node.input[k] not in inits or readers.get(node.input[k]) != 1:
            continue
        b_init = inits[node.input[k]]
        if b_init.data_type != onnx.TensorProto.FLOAT:
            continue
        b = numpy_helper.to_array(b_init).astype(np.float64)
        s = _bias_scale(node, producers, inits)
        if s is None or b.ndim != 1 or s.size not in (1, b.size) or not (s > 0).all():
            continue
        q = np.rint(b / np.broadcast_to(s, b.shape).astype(np.float64))
        if not np.all(np.abs(q) <= INT32_MAX):
            continue
        base = node.input[k]
        g.initializer.remove(b_init)
        g.initializer.extend([numpy_helper.from_array(q.astype(np.int32), base + "_int32"),
                              numpy_helper.from_array(np.broadcast_to(s, b.shape).copy(), base + "_b_scale"),
                              numpy_helper.from_array(np.zeros(b.shape, np.int32), base + "_b_zero_point")])
        new_nodes.append(helper.make_node("DequantizeLinear", [base + "_int32", base + "_b_scale",
                                                               base + "_b_zero_point"], [base], name=base + "_dq", axis=0))
        changed.append(node.name)
    for n in reversed(new_nodes):
        g.node.insert(0, n)
    return out, changed


def with_int32_biases(qdq):
    """``qdq`` (a ``QdqModel``) with ``int32_biases`` applied to its model; the same object when none changed."""
    from dataclasses import replace

    proto, changed = int32_biases(qdq.model)
    return replace(qdq, model=proto) if changed else qdq
