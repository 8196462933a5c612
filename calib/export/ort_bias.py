"""The Conv/ConvTranspose/Gemm biases ONNX Runtime's default optimisation overflows in an FP16/BF16 model.

ONNX Runtime's level-1 graph transformer ``WeightBiasQuantization``
(onnxruntime/core/optimizer/qdq_transformer/weight_bias_quantization.cc)
rewrites a Conv, ConvTranspose or Gemm whose input comes from a per-tensor
DequantizeLinear, whose weight comes from a DequantizeLinear (per tensor, or
per channel on axis 0 - Gemm: 1 without transB - without block_size), whose
output reaches a QuantizeLinear without branching (optionally through Relu or
Clip) and whose bias is a 1-D initializer: the float bias becomes
``DQ(Cast<int32>(Round(bias / (s_x * s_w))), s_x * s_w)``. The Mul and the
Div keep the bias's dtype, so in an FP16 remainder a channel with
``|b| / (s_x * s_w)`` above 65504 turns into inf and the int32 bias into
garbage (BF16: above ~3.4e38, i.e. a product of scales that underflows).

TensorRT does not run this rewrite: the model is right as the ONNX spec
evaluates it (ONNX Runtime with graph optimisation off). ``ort_bias_overflow``
finds the nodes by the same rules (top-level graph only) and the same dtype
arithmetic; the model is not changed.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

__all__ = ["ORT_TRANSFORMER", "ort_bias_overflow", "ort_bias_report", "ort_bias_line"]

ORT_TRANSFORMER = "WeightBiasQuantization"
_OPS = ("Conv", "ConvTranspose", "Gemm")
_LOW = {TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}
WORKAROUND = ("the model is for TensorRT (calib's spec evaluation is what TensorRT computes); to run it on ONNX "
              f"Runtime pass disabled_optimizers=[\"{ORT_TRANSFORMER}\"] to InferenceSession, or set graph "
              "optimisation off (ORT_DISABLE_ALL), or export with --target-runtime ort (fp32 remainder)")


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant-node tensors (ONNX Runtime turns Constant nodes into initializers on load)."""
    out = {t.name: t for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.output:
            a = next((a for a in n.attribute if a.name == "value"), None)
            if a is not None:
                out[n.output[0]] = a.t
    return out


def _scalar(t: onnx.TensorProto | None) -> bool:
    """``optimizer_utils::IsScalar``: rank 0, or rank 1 of one element."""
    return t is not None and (len(t.dims) == 0 or (len(t.dims) == 1 and t.dims[0] == 1))


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _path_to_q(node: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]) -> bool:
    """One consumer at each step until a QuantizeLinear, only Relu/Clip between (``IsNoBranchPathToQuantizeLinear``)."""
    cur = node
    while True:
        if len(cur.output) != 1:
            return False
        nxt = consumers.get(cur.output[0], [])
        if len(nxt) != 1:
            return False
        if nxt[0].op_type == "QuantizeLinear":
            return True
        if nxt[0].op_type not in ("Relu", "Clip"):
            return False
        cur = nxt[0]


def _weight_scale_ok(node: onnx.NodeProto, dq_w: onnx.NodeProto, scale: onnx.TensorProto, bias_size: int,
                     weight_rank: int | None) -> bool:
    """The per-channel weight-scale conditions of the rewrite (a per-tensor scale always passes)."""
    if _scalar(scale):
        return True
    if len(scale.dims) != 1 or scale.dims[0] != bias_size or _attr(dq_w, "block_size", 0) != 0:
        return False
    axis = _attr(dq_w, "axis", 1)
    if axis < 0:
        if weight_rank is None:
            return False
        axis += weight_rank
    expected = (1 if _attr(node, "transB", 0) == 0 else 0) if node.op_type == "Gemm" else 0
    return axis == expected


def _overflow(bias: np.ndarray, s_x: np.ndarray, s_w: np.ndarray) -> tuple[np.ndarray, float]:
    """Per channel: does Div(bias, Mul(s_x, s_w)) leave the bias dtype's finite range (computed in that dtype,
    as ONNX Runtime's kernels round each result)? And the largest |b| / (s_x s_w) in float64."""
    dt, ds = bias.dtype, s_w.dtype  # the Mul's output has the weight scale's dtype, the Div's the bias's
    scale = (s_x.reshape(-1).astype(ds) * s_w.reshape(-1)).astype(ds)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = (bias.astype(np.float32) / np.broadcast_to(scale, bias.shape).astype(np.float32)).astype(dt)
        ratio = np.abs(bias.astype(np.float64)) / (np.abs(s_x.astype(np.float64).reshape(-1))
                                                   * np.abs(s_w.astype(np.float64).reshape(-1)))
    bad = ~np.isfinite(q.astype(np.float32))
    return bad, float(np.nanmax(ratio)) if ratio.size else 0.0


def _match(node, producer, consumers, consts) -> dict[str, Any] | None:
    """The rewrite's conditions on one node; the arrays it would divide, or None when it does not apply."""
    if node.op_type not in _OPS or len(node.input) < 3 or not node.input[2]:
        return None
    dq_x, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
    if dq_x is None or dq_x.op_type != "DequantizeLinear" or not _scalar(consts.get(dq_x.input[1])):
        return None
    if not _path_to_q(node, consumers):
        return None
    bias = consts.get(node.input[2])
    if dq_w is None or dq_w.op_type != "DequantizeLinear" or bias is None or len(bias.dims) != 1:
        return None  # a float weight initializer is rewritten too, but only an FP32 one (FP32 bias then)
    if bias.data_type not in _LOW:
        return None
    s_w = consts.get(dq_w.input[1])
    w = consts.get(dq_w.input[0])
    if s_w is None or not _weight_scale_ok(node, dq_w, s_w, int(bias.dims[0]), len(w.dims) if w else None):
        return None
    return {"bias": numpy_helper.to_array(bias), "s_x": numpy_helper.to_array(consts[dq_x.input[1]]),
            "s_w": numpy_helper.to_array(s_w), "dtype": _LOW[bias.data_type]}


def ort_bias_overflow(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """Every node ONNX Runtime's ``WeightBiasQuantization`` rewrite breaks in ``model`` (a written Q/DQ model):
    node name, op type, bias tensor, dtype, channels that overflow (of how many), largest |b| / (s_x s_w)."""
    g = model.graph
    consts = _constants(g)
    producer = {o: n for n in g.node for o in n.output if o}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in g.node:
        for i in n.input:
            if i:
                consumers[i].append(n)
    out = []
    for node in g.node:
        m = _match(node, producer, consumers, consts)
        if m is None:
            continue
        bad, ratio = _overflow(m["bias"], m["s_x"], m["s_w"])
        if bad.any():
            out.append({"node": node.name, "op_type": node.op_type, "bias": node.input[2], "dtype": m["dtype"],
                        "channels": int(bad.sum()), "of": int(bad.size), "max_ratio": ratio})
    return out


def ort_bias_report(model: onnx.ModelProto) -> dict[str, Any] | None:
    """The scale report's ``onnxruntime_fp16_bias`` entry for ``model``, or None when no node is affected."""
    nodes = ort_bias_overflow(model)
    if not nodes:
        return None
    return {"nodes": nodes,
            "why": (f"ONNX Runtime's default graph optimisation ({ORT_TRANSFORMER}, level 1) requantizes these "
                    "Conv/Gemm biases to int32 as Div(bias, s_x*s_w) in the bias's dtype; |b|/(s_x*s_w) exceeds "
                    "that dtype's largest finite value, so the bias becomes inf/garbage on ONNX Runtime"),
            "workaround": WORKAROUND}


def ort_bias_line(report: dict[str, Any] | None) -> str:
    """One line for the CLI ('' when nothing is affected)."""
    if not report:
        return ""
    nodes = report["nodes"]
    return (f"ONNX Runtime: its default optimisation ({ORT_TRANSFORMER}) overflows the {nodes[0]['dtype']} bias "
            f"of {len(nodes)} node(s) (e.g. {nodes[0]['node']}, |b|/(s_x*s_w) = {nodes[0]['max_ratio']:.3g}); "
            + WORKAROUND)
