"""Precision decisions in TensorRT's units: fusion groups of an FP32 or Q/DQ model.

TensorRT picks kernels per fused group, not per ONNX node, so keeping one node
of a group in float (or in INT8) alone is not something TensorRT can run.
``fusion_groups`` partitions the compute nodes (Q/DQ and Cast nodes are seen
through) into groups that must change precision together:

* ``conv``: Conv/ConvTranspose (or Gemm/MatMul with a weight: ``gemm``) with
  the BatchNormalization, activation, residual Add and post-Add activation
  TensorRT fuses into it (each absorbed only when it is the sole consumer);
* ``concat``: a Concat with the groups producing its inputs, which share one
  output scale (TensorRT propagates the Concat's Q backward through it);
* ``attention``: the two activation-by-activation MatMuls of one attention
  block (Q·Kᵀ and P·V) with the Softmax and the scale/mask ops between them
  (TensorRT's fused multi-head attention);
* ``single``: any other node.

``expand_to_groups`` widens a node list to whole groups and
``modelopt_exclude`` writes the result as NVIDIA ModelOpt's
``nodes_to_exclude`` (``modelopt.onnx.quantization.quantize(...,
nodes_to_exclude=[...])``, also ``--nodes_to_exclude`` of its CLI).
Whether ModelOpt matches the names exactly or as regular expressions was not
checked against ModelOpt here (not installed): ``nodes_to_exclude`` holds the
plain names, ``nodes_to_exclude_regex`` anchored escaped patterns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

import onnx

from calib.errors import ConfigError
from calib.graph import CAST_OPS, QDQ_OPS

__all__ = ["FusionGroup", "fusion_groups", "group_index", "expand_to_groups", "modelopt_exclude"]

SEE_THROUGH = QDQ_OPS | CAST_OPS
CONV_OPS = frozenset({"Conv", "ConvTranspose"})
GEMM_OPS = frozenset({"Gemm", "MatMul"})
ACTIVATIONS = frozenset({"Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu",
                         "Softplus", "PRelu", "Gelu", "Mish", "ThresholdedRelu"})
_ATTN_BETWEEN = frozenset({"Mul", "Div", "Add", "Sub", "Where", "Reshape", "Transpose"})
_KIND_RANK = {"attention": 0, "concat": 1, "conv": 2, "gemm": 3, "single": 4}


@dataclass(frozen=True)
class FusionGroup:
    kind: str
    nodes: tuple[str, ...]  # graph order

    @property
    def anchor(self) -> str:
        return self.nodes[0]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "anchor": self.anchor, "nodes": list(self.nodes)}


class _View:
    """The compute graph with Q/DQ/Cast seen through: producer and consumers of each node."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        g = proto.graph
        self.inits = {t.name for t in g.initializer} | {n.output[0] for n in g.node if n.op_type == "Constant"}
        self.nodes = [n for n in g.node if n.op_type not in SEE_THROUGH and n.op_type != "Constant"]
        self.by_name = {n.name: n for n in self.nodes}
        self._prod = {o: n for n in g.node for o in n.output}
        self._cons: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for t in n.input:
                self._cons.setdefault(t, []).append(n)
        self.outputs = {o.name for o in g.output}

    def producer(self, t: str) -> onnx.NodeProto | None:
        n = self._prod.get(t)
        while n is not None and n.op_type in SEE_THROUGH:
            if n.input[0] in self.inits:
                return None  # a weight's Q/DQ
            n = self._prod.get(n.input[0])
        return n if n is not None and n.op_type != "Constant" else None

    def consumers(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        out, todo = [], [o for o in node.output if o]
        while todo:
            t = todo.pop()
            for c in self._cons.get(t, []):
                if c.op_type in SEE_THROUGH:
                    todo.extend(c.output)
                else:
                    out.append(c)
        return out

    def is_weight(self, t: str) -> bool:
        """An initializer/Constant, or one seen through its DequantizeLinear/Cast (not a graph input's Cast)."""
        n = self._prod.get(t)
        while n is not None and n.op_type in SEE_THROUGH:
            t = n.input[0]
            n = self._prod.get(t)
        return t in self.inits

    def graph_output(self, node: onnx.NodeProto) -> bool:
        return any(o in self.outputs for o in node.output)


class _Union:
    def __init__(self, names: Iterable[str]) -> None:
        self.parent = {n: n for n in names}
        self.kind = {n: "single" for n in self.parent}

    def find(self, n: str) -> str:
        while self.parent[n] != n:
            self.parent[n] = self.parent[self.parent[n]]
            n = self.parent[n]
        return n

    def join(self, a: str, b: str, kind: str) -> None:
        ra, rb = self.find(a), self.find(b)
        k = min(self.kind[ra], self.kind[rb], kind, key=_KIND_RANK.__getitem__)
        self.parent[rb] = ra
        self.kind[ra] = k


def _sole_next(v: _View, node: onnx.NodeProto, ops: frozenset[str]) -> onnx.NodeProto | None:
    if v.graph_output(node):
        return None
    cons = v.consumers(node)
    return cons[0] if len(cons) == 1 and cons[0].op_type in ops else None


def _conv_chain(v: _View, u: _Union, n: onnx.NodeProto) -> None:
    kind = "conv" if n.op_type in CONV_OPS else "gemm"
    if kind == "gemm" and not any(v.is_weight(i) for i in n.input[:2]):
        return  # activation x activation MatMul: attention or single
    u.kind[u.find(n.name)] = min(u.kind[u.find(n.name)], kind, key=_KIND_RANK.__getitem__)
    cur = n
    for ops in (frozenset({"BatchNormalization"}), ACTIVATIONS, frozenset({"Add"}), ACTIVATIONS):
        nxt = _sole_next(v, cur, ops)  # a stage may be absent (Conv -> Add); each is taken at most once
        if nxt is not None:
            u.join(n.name, nxt.name, kind)
            cur = nxt


def _attention(v: _View, u: _Union, sm: onnx.NodeProto) -> None:
    members, cur = [sm], sm
    while True:  # back to Q·Kᵀ through scale/mask ops
        prods = [v.producer(t) for t in cur.input if t and not v.is_weight(t)]
        prods = [p for p in prods if p is not None]
        mm = next((p for p in prods if p.op_type == "MatMul"), None)
        if mm is not None:
            break
        nxt = next((p for p in prods if p.op_type in _ATTN_BETWEEN), None)
        if nxt is None:
            return
        members.append(nxt)
        cur = nxt
    pv = next((c for c in v.consumers(sm) if c.op_type == "MatMul"), None)
    acts = lambda m: not any(v.is_weight(t) for t in m.input[:2])  # noqa: E731
    if pv is None or not acts(mm) or not acts(pv):
        return
    for m in members + [mm, pv]:
        u.join(sm.name, m.name, "attention")


def fusion_groups(proto: onnx.ModelProto) -> list[FusionGroup]:
    """Partition the compute nodes of ``proto`` (FP32 or Q/DQ) into TensorRT fusion groups, in graph order."""
    v = _View(proto)
    u = _Union(v.by_name)
    for n in v.nodes:
        if n.op_type in CONV_OPS or n.op_type in GEMM_OPS:
            _conv_chain(v, u, n)
    for n in v.nodes:
        if n.op_type == "Softmax":
            _attention(v, u, n)
    for n in v.nodes:
        if n.op_type == "Concat":
            for t in n.input:
                p = v.producer(t) if t and not v.is_weight(t) else None
                if p is not None:
                    u.join(n.name, p.name, "concat")
            u.kind[u.find(n.name)] = min(u.kind[u.find(n.name)], "concat", key=_KIND_RANK.__getitem__)
    members: dict[str, list[str]] = {}
    for n in v.nodes:
        members.setdefault(u.find(n.name), []).append(n.name)
    return [FusionGroup(u.kind[root], tuple(ns)) for root, ns in members.items()]


def group_index(groups: Iterable[FusionGroup]) -> dict[str, FusionGroup]:
    """Node name -> its group."""
    return {n: g for g in groups for n in g.nodes}


def expand_to_groups(nodes: Iterable[str], groups: Iterable[FusionGroup]) -> list[FusionGroup]:
    """The groups touching ``nodes`` (node names; unknown names are an error), in graph order."""
    groups = list(groups)
    idx = group_index(groups)
    wanted = list(nodes)
    unknown = [n for n in wanted if n not in idx]
    if unknown:
        raise ConfigError(f"node(s) not in the model's compute graph: {', '.join(map(repr, unknown[:5]))}")
    hit = {id(idx[n]) for n in wanted}
    return [g for g in groups if id(g) in hit]


def modelopt_exclude(nodes: Iterable[str], groups: Iterable[FusionGroup]) -> dict[str, Any]:
    """ModelOpt's ``nodes_to_exclude`` for keeping ``nodes`` in high precision, widened to whole groups."""
    chosen = expand_to_groups(nodes, groups)
    names = [n for g in chosen for n in g.nodes]
    return {"nodes_to_exclude": names,
            "nodes_to_exclude_regex": [f"^{re.escape(n)}$" for n in names],
            "groups": [g.to_json() for g in chosen]}
