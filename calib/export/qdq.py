"""Q/DQ ONNX export: ranges + a placement -> an explicitly quantized ONNX model.

The result is what TensorRT 10/11 builds from (explicit quantization) and what
ONNX Runtime's CPU provider turns into QLinear* kernels:

* activations: per-tensor symmetric int8, ``QuantizeLinear(x, amax/127, int8 0)``
  followed by ``DequantizeLinear``; the Q/DQ outputs get new names
  (``<t>_q``, ``<t>_dq``) and only the chosen consumers are rewired, so every
  original tensor keeps its name and its FP32-path value;
* weights: int8 initializers (``<w>_int8``) behind one DequantizeLinear with a
  per-output-channel ``axis``; a weight shared by several nodes gets one int8
  copy per axis; bias stays float;
* graph inputs, outputs, their shapes and ``metadata_props`` are kept.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from calib.calibrate.base import INT8_MAX, Ranges
from calib.calibrate.weights import weight_scales
from calib.errors import ConfigError, ModelError, RangesError
from calib.export.checks import check_needed, check_ranges_fit
from calib.export.fold import fold_batchnorm
from calib.export.placement import Plan, PlacementContext, WeightSlot, make_plan, resolve_exclude
from calib.io import save_onnx
from calib.model import Model, model_from_proto
from calib.model_guard import refuse_quantized

__all__ = ["QdqModel", "WeightQuant", "export_qdq", "weight_scales", "check_ranges_fit", "WEIGHT_MODES"]

log = logging.getLogger(__name__)

WEIGHT_MODES = ("per_channel", "per_tensor")
# Weights use the symmetric range [-127, 127] (TensorRT's and ONNX Runtime's symmetric int8 weights).
WEIGHT_QMIN, WEIGHT_QMAX = -INT8_MAX, INT8_MAX
INT32_MAX = 2**31 - 1
# |b| / (s_x s_w) is kept below 2^30, not 2^31: ONNX Runtime's fused kernels compute it in float32, where
# 2^31 - 1 rounds up to 2^31 and wraps to -2^31 (effnet_lite: a dead depthwise channel's ReLU6 output 0.94
# became 0), and the accumulated products need room beside the bias
BIAS_INT32_BOUND = 2**30


@dataclass
class WeightQuant:
    """One int8 weight as exported: which nodes read it, its axis and per-channel scales."""

    initializer: str
    int8_name: str
    nodes: list[str]
    axis: int | None
    scales: np.ndarray  # float32, one per channel (a single value when axis is None)
    zero_channels: int


@dataclass
class QdqModel:
    """An exported Q/DQ model and how it relates to the FP32 model.

    ``tensor_map`` maps every FP32 activation tensor (graph inputs and node
    outputs) to the tensor carrying the same value in ``model``: the identity,
    except for Conv outputs removed by BatchNormalization folding (listed in
    ``folded``, absent from the map). ``amax`` is the amax each quantized
    activation was exported with (after Concat scale sharing).
    """

    model: onnx.ModelProto
    tensor_map: dict[str, str]
    quantized_nodes: list[str]
    activation_tensors: list[str]
    excluded: list[str]
    placement: str = "trt"
    skipped: dict[str, str] = field(default_factory=dict)
    amax: dict[str, float] = field(default_factory=dict)
    shared: list[list[str]] = field(default_factory=list)
    weights: list[WeightQuant] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)
    rules: dict[str, list[str]] = field(default_factory=dict)  # tensor -> rules that quantized it

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model atomically."""
        return save_onnx(self.model, path)

    def summary(self) -> str:
        n_w = sum(len(w.nodes) for w in self.weights)
        parts = [f"{len(self.activation_tensors)} activation tensors and {n_w} weights quantized "
                 f"({self.placement} placement), {len(self.quantized_nodes)} nodes in int8"]
        if self.excluded:
            parts.append(f"{len(self.excluded)} nodes excluded")
        if self.skipped:
            parts.append(f"{len(self.skipped)} tensors skipped")
        if self.folded:
            parts.append(f"{len(self.folded)} BatchNormalization folded")
        return "; ".join(parts)


# ---------------------------------------------------------------- validation


# ---------------------------------------------------------------- weights


def _amax_from_user(node: str, value: Any, channels: int) -> np.ndarray:
    arr = np.asarray(getattr(value, "amax", value), dtype=np.float64).reshape(-1)
    if arr.size == 1 and channels != 1:
        arr = np.full(channels, float(arr[0]))
    if arr.size != channels:
        raise RangesError(f"weight_amax for node '{node}' has {arr.size} values, expected {channels} (one per channel)")
    return arr


def _quantize_weight(w: np.ndarray, scales: np.ndarray, axis: int | None, qmax: int = WEIGHT_QMAX) -> np.ndarray:
    s = scales.reshape([-1 if d == axis else 1 for d in range(w.ndim)]) if axis is not None else scales[0]
    q = np.rint(w.astype(np.float32) / s)
    return np.clip(q, max(WEIGHT_QMIN, -qmax), min(WEIGHT_QMAX, qmax)).astype(np.int8)


# ---------------------------------------------------------------- graph edits


class _Names:
    def __init__(self, proto: onnx.ModelProto) -> None:
        g = proto.graph
        self.used = {t.name for t in g.initializer} | {v.name for v in g.input} | {v.name for v in g.output}
        self.used |= {t for n in g.node for t in list(n.input) + list(n.output)} | {n.name for n in g.node}

    def new(self, base: str) -> str:
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name


def _shared_amax(plan: Plan, ranges: Ranges) -> dict[str, float]:
    amax = {t: float(ranges[t].amax) for t in plan.tensors}
    groups: list[set[str]] = []
    for members in plan.shared:
        g = {t for t in members if t in amax}
        for other in [o for o in groups if o & g]:
            g |= other
            groups.remove(other)
        groups.append(g)
    for g in groups:
        m = max(amax[t] for t in g)
        for t in g:
            amax[t] = m
    return amax


def activation_scale(amax: float) -> np.ndarray:
    """The float32 scale of an activation: ``amax / 127``, never below the smallest normal float32."""
    return np.maximum(np.array(amax / INT8_MAX, dtype=np.float32), np.float32(np.finfo(np.float32).tiny))


def bias_floors(model: Model, plan: Plan, amax: Mapping[str, float]) -> dict[str, np.ndarray]:
    """Per weighted node with a float bias: the smallest weight scale per output channel that keeps
    ``|b| / (s_x * s_w)`` below ``BIAS_INT32_BOUND`` (2^30), so the int32 bias ONNX Runtime and TensorRT make
    of it fits, with room for float32 rounding and the accumulated products.

    ``s_x`` is the scale of the node's quantized activation input 0. A dead channel (weights about 0)
    would otherwise get a scale so small that its bias overflows int32.
    """
    act = {e.node: e.tensor for e in plan.edges if e.index == 0}
    out = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) < 3 or node.name not in act:
            continue
        b = model.weight(node.input[2])
        t = act[node.name]
        if b is None or t not in amax or b.dtype.kind != "f":
            continue
        s_x = float(activation_scale(amax[t]))
        out[node.name] = np.abs(b.astype(np.float64)).reshape(-1) / (s_x * BIAS_INT32_BOUND)
    return out


def _slot_floor(members: list[WeightSlot], floors: Mapping[str, np.ndarray], channels: int):
    """The scale floor of a weight shared by ``members``: per channel when the bias has one value per
    channel, else the largest (one bound for every channel)."""
    fs = [floors[s.node] for s in members if s.node in floors]
    if not fs:
        return None
    if all(f.size == channels for f in fs):
        return np.max(np.stack(fs), axis=0)
    return max(float(f.max()) for f in fs if f.size)


def _activation_qdq(proto, plan: Plan, amax: dict[str, float], names: _Names) -> dict[str, list[onnx.NodeProto]]:
    """Create Q/DQ nodes per tensor, rewire the planned edges; return nodes to insert after each tensor."""
    g = proto.graph
    nodes_by_name = {n.name: n for n in g.node}
    after: dict[str, list[onnx.NodeProto]] = {}
    for t in plan.tensors:
        scale = names.new(f"{t}_scale")
        zp = names.new(f"{t}_zero_point")
        q_out, dq_out = names.new(f"{t}_q"), names.new(f"{t}_dq")
        g.initializer.append(numpy_helper.from_array(activation_scale(amax[t]), scale))
        g.initializer.append(numpy_helper.from_array(np.array(0, dtype=np.int8), zp))
        q = helper.make_node("QuantizeLinear", [t, scale, zp], [q_out], name=names.new(f"{t}_QuantizeLinear"))
        dq = helper.make_node("DequantizeLinear", [q_out, scale, zp], [dq_out],
                              name=names.new(f"{t}_DequantizeLinear"))
        after[t] = [q, dq]
    for e in plan.edges:
        node = nodes_by_name[e.node]
        node.input[e.index] = after[e.tensor][1].output[0]
    return after


def _weight_dq(proto, model: Model, slots: list[WeightSlot], weight_amax: Mapping[str, Any] | None,
               names: _Names, floors: Mapping[str, np.ndarray], weight_bits: Mapping[str, int] | None = None
               ) -> tuple[list[onnx.NodeProto], list[WeightQuant]]:
    g = proto.graph
    nodes_by_name = {n.name: n for n in g.node}
    groups: dict[tuple[str, int | None], list[WeightSlot]] = {}
    for s in slots:
        groups.setdefault((s.initializer, s.axis), []).append(s)
    multi_axis = {init for (init, _), _s in groups.items() if sum(1 for k in groups if k[0] == init) > 1}
    dq_nodes, infos = [], []
    for (init, axis), members in groups.items():
        w = model.weight(init)
        if not np.all(np.isfinite(w)):
            raise ModelError(f"weight '{init}' of node '{members[0].node}' holds non-finite values; cannot quantize",
                             hint=f"fix the model or keep the node float with --exclude {members[0].node}")
        channels = 1 if axis is None else w.shape[axis]
        user = None
        if weight_amax is not None:
            key = next((s.node for s in members if s.node in weight_amax), None)
            if key is not None:
                user = _amax_from_user(key, weight_amax[key], channels)
        # weight_bits < 8 (e.g. 7: |q| <= 64, ORT's reduce_range) stays symmetric int8 with zero point 0
        qmax = min([INT8_MAX] + [2 ** (int(weight_bits[s.node]) - 1) for s in members if s.node in (weight_bits or {})])
        scales, zero = weight_scales(w, axis, user, floor=_slot_floor(members, floors, channels), qmax=qmax)
        q = _quantize_weight(w, scales, axis, qmax)
        base = f"{init}_int8" if init not in multi_axis else f"{init}_int8_axis{axis}"
        q_name = names.new(base)
        s_name, zp_name = names.new(f"{init}_w_scale"), names.new(f"{init}_w_zero_point")
        dq_out = names.new(f"{init}_dq" if init not in multi_axis else f"{init}_dq_axis{axis}")
        g.initializer.append(numpy_helper.from_array(q, q_name))
        if axis is None:
            g.initializer.append(numpy_helper.from_array(scales.reshape(()), s_name))
            g.initializer.append(numpy_helper.from_array(np.array(0, dtype=np.int8), zp_name))
            dq = helper.make_node("DequantizeLinear", [q_name, s_name, zp_name], [dq_out],
                                  name=names.new(f"{init}_DequantizeLinear"))
        else:
            g.initializer.append(numpy_helper.from_array(scales, s_name))
            g.initializer.append(numpy_helper.from_array(np.zeros(channels, dtype=np.int8), zp_name))
            dq = helper.make_node("DequantizeLinear", [q_name, s_name, zp_name], [dq_out], axis=axis,
                                  name=names.new(f"{init}_DequantizeLinear"))
        dq_nodes.append(dq)
        for s in members:
            nodes_by_name[s.node].input[s.index] = dq_out
        infos.append(WeightQuant(init, q_name, [s.node for s in members], axis, scales, zero))
    return dq_nodes, infos


def _drop_unused_float_weights(proto: onnx.ModelProto, candidates: set[str]) -> None:
    g = proto.graph
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    gone = {c for c in candidates if c not in used}
    if not gone:
        return
    keep = [t for t in g.initializer if t.name not in gone]
    del g.initializer[:]
    g.initializer.extend(keep)
    keep_in = [v for v in g.input if v.name not in gone]
    del g.input[:]
    g.input.extend(keep_in)


def _reorder(proto: onnx.ModelProto, head: list[onnx.NodeProto], after: dict[str, list[onnx.NodeProto]]) -> None:
    """Weight DQs first, graph-input Q/DQs next, each tensor's Q/DQ right after its producer."""
    g = proto.graph
    produced = {o for n in g.node for o in n.output}
    order = list(head)
    for t, qdq in after.items():
        if t not in produced:
            order.extend(qdq)
    for n in g.node:
        order.append(n)
        for o in n.output:
            order.extend(after.get(o, []))
    del g.node[:]
    g.node.extend(order)


# ---------------------------------------------------------------- entry point


def export_qdq(
    model: Model,
    ranges: Ranges,
    *,
    weights: str = "per_channel",
    placement: str = "trt",
    exclude: Iterable[str] = (),
    weight_amax: Mapping[str, Any] | None = None,
    fold_bn: bool | None = None,
    flagged: Mapping[str, str] | None = None,
    weight_bits: Mapping[str, int] | None = None,
) -> QdqModel:
    """Insert Q/DQ into a copy of ``model`` following ``placement``; ``model`` itself is not changed.

    ``weights``: "per_channel" (default) or "per_tensor". ``exclude``: node
    names, op types or tensor names to keep float. ``weight_amax``: optional
    node name -> per-channel amax (array, or an object with ``.amax``) replacing
    max|w|. ``fold_bn``: fold Conv+BatchNormalization first (default: only for
    the "ort" placement, see ``calib.export.fold``). ``flagged``: tensor ->
    reason for tensors that must never be quantized (e.g. statistics saw
    non-finite values); they are listed in ``QdqModel.skipped``. ``weight_bits``:
    node name -> bits of its weight (7: scale amax/64, |q| <= 64, still int8 with
    zero point 0; see calib.compare.deployed); 8 when absent.
    """
    if weights not in WEIGHT_MODES:
        raise ConfigError(f"weights='{weights}': expected one of {', '.join(WEIGHT_MODES)}")
    refuse_quantized(model)
    check_ranges_fit(model, ranges)
    excluded_nodes, excluded_tensors = resolve_exclude(model, exclude)
    fold_bn = placement == "ort" if fold_bn is None else fold_bn
    work, folded = _folded(model, fold_bn)
    if folded:
        excluded_nodes = frozenset(n for n in excluded_nodes if n in work.nodes)
    ctx = PlacementContext(work, ranges, excluded_nodes, excluded_tensors, dict(flagged or {}))
    plan = make_plan(ctx, placement, per_channel=weights == "per_channel")
    check_needed(plan, ranges)
    if not plan.edges and not plan.weights and not excluded_nodes and not excluded_tensors and not plan.skipped:
        raise ModelError(f"{model.path or 'model'}: nothing to quantize (no node TensorRT runs in INT8 under "
                         f"the '{placement}' placement)", hint="INT8 calibration needs Conv, MatMul, Gemm or similar")
    amax = _shared_amax(plan, ranges)

    proto = work.copy_proto()
    names = _Names(proto)
    after = _activation_qdq(proto, plan, amax, names)
    head, infos = _weight_dq(proto, work, plan.weights, weight_amax, names, bias_floors(work, plan, amax), weight_bits)
    _drop_unused_float_weights(proto, {w.initializer for w in plan.weights})
    _reorder(proto, head, after)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:  # a bug in calib, not bad input
        raise RuntimeError(f"exported Q/DQ model fails onnx.checker: {e}") from e

    result = _result(model, work, proto, plan, amax, infos, folded, sorted(excluded_nodes), placement)
    log.info("%s", result.summary())
    return result


def _folded(model: Model, fold_bn: bool) -> tuple[Model, list[str]]:
    """``model`` with Conv+BatchNormalization folded (a new ``Model``) when asked and possible; removed tensors."""
    if not fold_bn:
        return model, []
    proto = model.copy_proto()
    folded = fold_batchnorm(proto)
    if not folded:
        return model, []
    work = model_from_proto(proto)
    work.sha256 = model.sha256
    return work, folded


def _result(model: Model, work: Model, proto: onnx.ModelProto, plan: Plan, amax: dict[str, float], infos,
            folded: list[str], excluded: list[str], placement: str) -> QdqModel:
    """The ``QdqModel``: tensor map (FP32 names kept), rules per tensor, tensors in graph order."""
    activations = [i.name for i in model.graph.input if i.name not in model.initializers] + \
        [o for n in model.graph.node for o in n.output if o]
    folded_set = set(folded)
    tensor_map = {t: t for t in activations if t not in folded_set}
    rules: dict[str, list[str]] = {}
    for e, why in plan.why.items():
        rules.setdefault(e.tensor, [])
        if why not in rules[e.tensor]:
            rules[e.tensor].append(why)
    position = {t: i for i, t in enumerate(activations)}
    ordered = sorted(plan.tensors, key=lambda t: (position.get(t, len(position)), t))
    return QdqModel(
        model=proto,
        tensor_map=tensor_map,
        quantized_nodes=[n.name for n in work.graph.node if n.name in plan.quantized_nodes],
        activation_tensors=ordered,
        excluded=excluded,
        placement=placement,
        skipped=dict(plan.skipped),
        amax=amax,
        shared=[list(s) for s in plan.shared],
        weights=infos,
        folded=folded,
        rules=rules,
    )

