"""Graph surgery for sensitivity and mixed precision: many model variants in one ONNX Runtime session.

A ``Variant`` rewires some inputs of some nodes of a *base* model (e.g. a
quantized Conv reads the float tensor before its Q/DQ pair, or a Q/DQ pair with
another scale). Only the rewired nodes and what depends on them change, so
``build_multi`` copies just that suffix of the graph per variant (tensors renamed
``name::variant``) into one model that shares everything upstream. One session
run then evaluates the base and every variant, computing the shared prefix
once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from calib.compare.mapping import TensorMap, float_constant
from calib.graph import is_precision_cast

__all__ = ["Edit", "Variant", "build_multi", "apply_edits", "prune", "suffix_nodes", "float_node_variant",
           "quantize_only_variant", "rescale_variant", "group_variants"]

SEP = "::"


@dataclass(frozen=True)
class Edit:
    """Make input ``index`` of node ``node`` (in the base model) read ``tensor``."""

    node: str
    index: int
    tensor: str


@dataclass
class Variant:
    name: str
    edits: list[Edit]
    nodes: list[onnx.NodeProto] = field(default_factory=list)  # extra nodes reading base tensors
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    note: str = ""


def _consumers(proto: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in proto.graph.node:
        for i in n.input:
            if i:
                out.setdefault(i, []).append(n)
    return out


def suffix_nodes(proto: onnx.ModelProto, dirty: Iterable[str], consumers=None) -> list[onnx.NodeProto]:
    """Nodes named in ``dirty`` and every node downstream of them, in graph order."""
    consumers = consumers if consumers is not None else _consumers(proto)
    by_name = {n.name: n for n in proto.graph.node}
    todo = [by_name[d] for d in dirty]
    seen = {n.name for n in todo}
    while todo:
        n = todo.pop()
        for o in n.output:
            for c in consumers.get(o, []):
                if c.name not in seen:
                    seen.add(c.name)
                    todo.append(c)
    return [n for n in proto.graph.node if n.name in seen]


def _toposort(g: onnx.GraphProto) -> None:
    avail = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    pending = list(g.node)
    order: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for n in pending:
            if all(i in avail for i in n.input):
                order.append(n)
                avail.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            missing = sorted({i for n in rest for i in n.input if i not in avail})[:3]
            raise RuntimeError(f"variant graph is not a DAG or reads unknown tensors {missing}")
        pending = rest
    del g.node[:]
    g.node.extend(order)


def apply_edits(proto: onnx.ModelProto, variant: Variant) -> None:
    """Apply a variant in place (no copies): used to build a base model."""
    by_name = {n.name: n for n in proto.graph.node}
    _add_extras(proto, variant)
    for e in variant.edits:
        by_name[e.node].input[e.index] = e.tensor
    _toposort(proto.graph)


def _add_extras(proto: onnx.ModelProto, variant: Variant) -> None:
    have = {t.name for t in proto.graph.initializer}
    for t in variant.initializers:
        if t.name not in have:
            proto.graph.initializer.append(t)
            have.add(t.name)
    proto.graph.node.extend(variant.nodes)


def build_multi(base: onnx.ModelProto, variants: Sequence[Variant], outputs: Sequence[str]
                ) -> tuple[onnx.ModelProto, dict[str, dict[str, str]]]:
    """One model holding ``base`` plus a suffix copy per variant.

    Returns the model and, per variant (and ``"base"``), which tensor holds each
    of ``outputs``. The caller marks those tensors as graph outputs.
    """
    m = onnx.ModelProto()
    m.CopyFrom(base)
    consumers = _consumers(base)
    where: dict[str, dict[str, str]] = {"base": {o: o for o in outputs}}
    new_nodes: list[onnx.NodeProto] = []
    for v in variants:
        _add_extras(m, Variant(v.name, [], [], v.initializers))
        new_nodes.extend(v.nodes)
        edits = {(e.node, e.index): e.tensor for e in v.edits}
        renamed: dict[str, str] = {}
        for n in suffix_nodes(base, {e.node for e in v.edits}, consumers):
            c = copy.deepcopy(n)
            c.name = f"{n.name}{SEP}{v.name}"
            for k, i in enumerate(n.input):
                if (n.name, k) in edits:
                    c.input[k] = edits[(n.name, k)]
                elif i in renamed:
                    c.input[k] = renamed[i]
            for k, o in enumerate(n.output):
                if o:
                    renamed[o] = c.output[k] = f"{o}{SEP}{v.name}"
            new_nodes.append(c)
        where[v.name] = {o: renamed.get(o, o) for o in outputs}
    m.graph.node.extend(new_nodes)
    _toposort(m.graph)
    return m, where


def prune(proto: onnx.ModelProto, keep: Iterable[str]) -> onnx.ModelProto:
    """Drop nodes and initializers nothing in ``keep`` depends on (in place; returns ``proto``)."""
    g = proto.graph
    needed = set(keep)
    live = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            live.append(n)
            needed.update(i for i in n.input if i)
    live.reverse()
    del g.node[:]
    g.node.extend(live)
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    vi = [v for v in g.value_info if v.name in needed]
    del g.value_info[:]
    g.value_info.extend(vi)
    return proto


def float_node_variant(tm: TensorMap, fp32_node: str, name: str) -> Variant:
    """The node reads float: activations from before their Q/DQ chain, weights as float initializers.

    A weight whose float value cannot be recovered (see ``float_constant``) stays quantized;
    the variant's ``note`` says so. In an FP16/BF16 model the float input takes the dtype the
    node read (a Cast is added where the tensor before the Q has another one).
    """
    qnode = tm.nodes[fp32_node]
    types = tm.qdq.tensor_types
    edits, nodes, inits, kept = [], [], [], []
    for qi in tm.quantized.get(fp32_node, []):
        want = types.get(qi.tensor)
        if not qi.is_weight:
            src = qi.source
            if want and types.get(src, want) != want:
                src = f"{qi.tensor}{SEP}{name}{SEP}cast"
                nodes.append(helper.make_node("Cast", [qi.source], [src], name=src, to=want))
            edits.append(Edit(qnode, qi.index, src))
            continue
        w = float_constant(tm, fp32_node, qi)
        if w is None:
            kept.append(qi.tensor)
            continue
        t = _float_init(np.asarray(w), f"{qi.tensor}{SEP}float", want)
        inits.append(t)
        edits.append(Edit(qnode, qi.index, t.name))
    note = f"weights kept quantized: {', '.join(kept)}" if kept else ""
    return Variant(name, edits, nodes, inits, note)


def _float_init(w: np.ndarray, name: str, dtype: int | None) -> onnx.TensorProto:
    """``w`` as an initializer of ``dtype`` (the dtype the node read; bfloat16 through ONNX's converter)."""
    if dtype == onnx.TensorProto.BFLOAT16:
        return helper.make_tensor(name, dtype, w.shape, w.astype(np.float32).ravel().tolist())
    if dtype and dtype in (onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT):
        w = w.astype(helper.tensor_dtype_to_np_dtype(dtype))
    return numpy_helper.from_array(w, name)


def quantize_only_variant(tm: TensorMap, fp32_node: str, name: str) -> Variant:
    """On the all-float base: the node reads its Q/DQ chains again (their tensors stay in that base)."""
    qnode = tm.nodes[fp32_node]
    return Variant(name, [Edit(qnode, qi.index, qi.tensor) for qi in tm.quantized.get(fp32_node, [])])


def rescale_variant(base: onnx.ModelProto, tm: TensorMap, qdq_tensor: str, scale: float, name: str) -> Variant | None:
    """Every Q/DQ chain on activation ``qdq_tensor`` uses ``scale`` (zero point kept); None if it has none."""
    consumers = _consumers(base)
    edits: list[Edit] = []
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    for q in _through_casts(consumers, qdq_tensor):
        if q.op_type != "QuantizeLinear":
            continue
        s_name = f"{q.input[1]}{SEP}{name}"
        old = next((t for t in base.graph.initializer if t.name == q.input[1]), None)
        if old is None:
            continue
        dtype = numpy_helper.to_array(old).dtype
        inits.append(numpy_helper.from_array(np.array(scale, dtype=dtype), s_name))
        q2 = copy.deepcopy(q)
        q2.name = f"{q.name}{SEP}{name}"
        q2.input[1] = s_name
        q2.output[0] = f"{q.output[0]}{SEP}{name}"
        nodes.append(q2)
        for dq in consumers.get(q.output[0], []):
            if dq.op_type != "DequantizeLinear":
                continue
            dq2 = copy.deepcopy(dq)
            dq2.name = f"{dq.name}{SEP}{name}"
            dq2.input[0] = q2.output[0]
            dq2.input[1] = s_name
            dq2.output[0] = f"{dq.output[0]}{SEP}{name}"
            nodes.append(dq2)
            for c in consumers.get(dq.output[0], []):
                for k, i in enumerate(c.input):
                    if i == dq.output[0]:
                        edits.append(Edit(c.name, k, dq2.output[0]))
    if not edits:
        return None
    return Variant(name, edits, nodes, inits)


def _through_casts(consumers: dict[str, list[onnx.NodeProto]], tensor: str) -> list[onnx.NodeProto]:
    """The readers of ``tensor`` and of its precision Casts (an FP16 remainder casts before a Q)."""
    out, todo = [], [tensor]
    while todo:
        for c in consumers.get(todo.pop(), []):
            out.append(c)
            if is_precision_cast(c):
                todo.append(c.output[0])
    return out


def group_variants(base: onnx.ModelProto, variants: Sequence[Variant], budget: int) -> list[list[Variant]]:
    """Split variants into groups whose copied suffixes hold at most ``budget`` nodes (at least one each)."""
    consumers = _consumers(base)
    groups: list[list[Variant]] = []
    cur: list[Variant] = []
    size = 0
    for v in variants:
        k = len(suffix_nodes(base, {e.node for e in v.edits}, consumers)) + len(v.nodes)
        if cur and size + k > budget:
            groups.append(cur)
            cur, size = [], 0
        cur.append(v)
        size += k
    if cur:
        groups.append(cur)
    return groups
