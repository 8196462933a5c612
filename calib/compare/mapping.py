"""Pair every FP32 tensor with its counterpart in a Q/DQ model, by graph structure.

Q/DQ insertion renames and adds tensors: ``x -> QuantizeLinear -> DequantizeLinear
-> conv`` makes ``conv`` read a new tensor, ONNX Runtime's ``quantize_static``
renames the producer of a graph output (``relu_out`` becomes
``relu_out_QuantizeLinear_Input`` and the last DequantizeLinear writes
``relu_out``), removes a Relu whose clipping the following QuantizeLinear does,
and calib's ``ort`` placement folds BatchNormalization into the Conv before it.
Names therefore prove nothing. ``map_models`` walks the FP32 graph in
topological order and, for each node, looks for the Q/DQ-model node with the
same op whose *activation* inputs are the counterparts of the FP32 node's
inputs once every Q/DQ chain and every Cast between float dtypes (the boundary Casts of an
FP16/BF16 remainder, ``calib.graph.is_precision_cast``) is looked through (constant inputs, which
quantization rewrites, are not compared). Ties (two Convs reading one tensor)
are broken by attributes, then weight shapes, then order.

FP32 nodes with no counterpart are classified:

* ``Identity``/``Dropout``/a Cast between float dtypes: removed (or seen through); the output is the input.
* ``BatchNormalization`` after a matched node: folded into it; the FP32 BN output
  pairs with the folded node's output, and the pre-BN tensor is not comparable.
* ``Relu``/``Clip``: fused into the following QuantizeLinear (its range clips);
  the FP32 output pairs with that Q/DQ chain's dequantized tensor.
* anything else: unmatched; listed, as is everything that depends on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from calib.errors import ModelError
from calib.graph import QDQ_OPS, attr, constant_tensors, fold_bn, is_precision_cast
from calib.model import Model

__all__ = ["QdqInput", "TensorPair", "TensorMap", "map_models", "fold_bn_into", "float_constant", "QDQ_OPS"]

log = logging.getLogger(__name__)

_NOOP_OPS = frozenset({"Identity", "Dropout"})
_FOLDABLE_OPS = frozenset({"BatchNormalization"})
_FUSABLE_ACTIVATIONS = frozenset({"Relu", "Clip"})
_CONST = "\x00const"
# Below this share of matched FP32 nodes the Q/DQ model is taken for a different model.
MIN_MATCHED_FRACTION = 0.5


@dataclass(frozen=True)
class QdqInput:
    """One input of a quantized node in the Q/DQ model that reads through a Q/DQ chain.

    ``source`` is the float tensor the first QuantizeLinear reads (an activation, or a
    float initializer for ``Q(W) -> DQ``); it is None for a weight stored as integers
    (``DQ(W_int8)``). ``value`` is the same value before any precision Cast (what
    ``TensorMap.sources`` holds): ``x -> Cast(fp16) -> Q -> DQ`` has source ``x``'s Cast
    output and value ``x``. ``chain`` lists the Cast and Q/DQ node names, source first.
    """

    index: int
    tensor: str  # what the node reads (the last DequantizeLinear's output, or a Cast of it)
    source: str | None
    chain: tuple[str, ...]
    is_weight: bool
    value: str | None = None


@dataclass(frozen=True)
class TensorPair:
    """One comparable tensor: FP32 name, Q/DQ-model name, and the FP32 node that makes it."""

    fp32: str
    qdq: str
    node: str
    op_type: str
    depth: int
    note: str = ""  # e.g. "BatchNormalization folded into 'conv1'"


@dataclass
class TensorMap:
    """How a Q/DQ model relates to its FP32 model.

    ``nodes`` maps FP32 node -> Q/DQ node; ``sources`` maps FP32 tensor -> the
    float Q/DQ-model tensor computing the same value (before any Q/DQ);
    ``pairs`` lists the tensors that can be compared; ``quantized`` maps each
    quantized FP32 node to its inputs that read through Q/DQ chains.
    """

    fp32: Model
    qdq: Model
    nodes: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    pairs: list[TensorPair] = field(default_factory=list)
    quantized: dict[str, list[QdqInput]] = field(default_factory=dict)
    folded: dict[str, str] = field(default_factory=dict)  # FP32 node -> FP32 node it was folded into
    skipped: dict[str, str] = field(default_factory=dict)  # FP32 tensor -> why it is not compared
    unmatched: list[str] = field(default_factory=list)  # FP32 nodes with no counterpart

    @property
    def tensor_map(self) -> dict[str, str]:
        """FP32 tensor -> compared Q/DQ-model tensor."""
        return {p.fp32: p.qdq for p in self.pairs}

    @property
    def quantized_nodes(self) -> list[str]:
        return list(self.quantized)

    def summary(self) -> dict:
        return {
            "matched_nodes": len(self.nodes),
            "fp32_nodes": len(self.fp32.graph.node),
            "compared_tensors": len(self.pairs),
            "quantized_nodes": len(self.quantized),
            "folded": dict(self.folded),
            "unmatched_nodes": list(self.unmatched),
            "node_inputs": {n: [self.fp32.nodes[n].input[q.index] for q in qs
                                if not q.is_weight and q.index < len(self.fp32.nodes[n].input)]
                            for n, qs in self.quantized.items()},
            "skipped_tensors": dict(self.skipped),
        }


class _QdqGraph:
    """Indexes over the Q/DQ model: producers, constants, chains looked through."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.producer = model.producers
        self.const = constant_tensors(model.graph, constant_nodes=True)
        self.inits = set(model.initializers)
        self.types = model.tensor_types
        self._src: dict[str, tuple[str | None, tuple[str, ...]]] = {}

    def source(self, t: str) -> tuple[str | None, tuple[str, ...]]:
        """(float source, chain of Q/DQ and precision-Cast node names) of ``t``; source None for an integer weight.

        ``x -> Cast -> Q -> DQ -> conv``: the source is ``x``, the value before every Q/DQ and precision Cast."""
        hit = self._src.get(t)
        if hit is not None:
            return hit
        chain: list[str] = []
        cur, res = t, None
        while res is None:
            p = self.producer.get(cur)
            if p is None or (p.op_type not in QDQ_OPS and not is_precision_cast(p, self.types)):
                break
            chain.append(p.name)
            cur = p.input[0]
            if p.op_type == "DequantizeLinear":
                q = self.producer.get(cur)
                if q is None or q.op_type != "QuantizeLinear":
                    # DQ of stored integers (a weight) or of a graph input: no float source inside the graph
                    res = (None, tuple(reversed(chain)))
        res = res or (cur, tuple(reversed(chain)))
        self._src[t] = res
        return res

    def quantized_input(self, t: str) -> str | None:
        """The tensor the first QuantizeLinear of ``t``'s chain reads (None: no such Q, e.g. a stored weight)."""
        _, chain = self.source(t)
        q = next((self.model.nodes[n] for n in chain if self.model.nodes[n].op_type == "QuantizeLinear"), None)
        return q.input[0] if q is not None else None

    def resolved(self, t: str) -> str:
        if not t:
            return ""
        if t in self.const:
            return _CONST
        src, _ = self.source(t)
        if src is None or src in self.const:
            return _CONST
        return src


def _key_fp32(node: onnx.NodeProto, sources: dict[str, str], const: set[str]) -> tuple | None:
    key = []
    for k, i in enumerate(node.input):
        if not i or i in const:
            continue
        s = sources.get(i)
        if s is None:
            return None
        key.append((k, s))
    return tuple(key)


def _key_qdq(node: onnx.NodeProto, g: _QdqGraph) -> tuple:
    key = []
    for k, i in enumerate(node.input):
        r = g.resolved(i)
        if r and r != _CONST:
            key.append((k, r))
    return tuple(key)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _pick(fp: onnx.NodeProto, fp32: Model, cands: list[onnx.NodeProto], qdq: Model) -> onnx.NodeProto:
    if len(cands) == 1:
        return cands[0]
    a = _attrs(fp)
    same = [c for c in cands if _attrs(c) == a] or cands
    if len(same) > 1:
        def wshape(model: Model, n: onnx.NodeProto) -> tuple:
            out = []
            for i in n.input[1:]:
                arr = model.initializers.get(i)
                out.append(tuple(arr.dims) if arr is not None else None)
            return tuple(out)

        fs = wshape(fp32, fp)
        # a quantized weight sits behind DequantizeLinear; compare the integer initializer's shape
        def qshape(n: onnx.NodeProto) -> tuple:
            out = []
            for i in n.input[1:]:
                p = qdq.producers.get(i)
                while p is not None and p.op_type in QDQ_OPS:
                    i = p.input[0]
                    p = qdq.producers.get(i)
                t = qdq.initializers.get(i)
                out.append(tuple(t.dims) if t is not None else None)
            return tuple(out)

        by_shape = [c for c in same if qshape(c)[: len(fs)] == fs]
        same = by_shape or same
    named = [c for c in same if c.name == fp.name]
    return (named or same)[0]


def map_models(fp32: Model, qdq: Model) -> TensorMap:
    """Pair the FP32 model's nodes and tensors with the Q/DQ model's; raise ``ModelError`` if unrelated."""
    _check_io(fp32, qdq)
    g = _QdqGraph(qdq)
    tm = TensorMap(fp32=fp32, qdq=qdq)
    fconst = constant_tensors(fp32.graph, constant_nodes=True)
    index: dict[tuple, list[onnx.NodeProto]] = {}
    for n in qdq.graph.node:
        if n.op_type in QDQ_OPS or is_precision_cast(n, g.types) or all((not o) or o in g.const for o in n.output):
            continue
        index.setdefault((n.domain or "", n.op_type, _key_qdq(n, g)), []).append(n)
    for i in fp32.inputs:
        tm.sources[i.name] = i.name
    dq_of: dict[str, str] = {}  # float source -> a dequantized tensor of it
    for n in qdq.graph.node:
        if n.op_type == "DequantizeLinear":
            src, _ = g.source(n.output[0])
            if src is not None:
                dq_of.setdefault(src, n.output[0])
    depth = fp32.depth
    compared: dict[str, TensorPair] = {}
    n_compute = 0
    for fn in fp32.graph.node:
        if all((not o) or o in fconst for o in fn.output):
            continue
        n_compute += 1
        key = _key_fp32(fn, tm.sources, fconst)
        cands = index.get((fn.domain or "", fn.op_type, key), []) if key is not None else []
        if cands:
            qn = _pick(fn, fp32, cands, qdq)
            cands.remove(qn)
            tm.nodes[fn.name] = qn.name
            for fo, qo in zip(fn.output, qn.output):
                if fo and qo:
                    tm.sources[fo] = qo
                    if fp32.is_float(fo):
                        compared[fo] = TensorPair(fo, qo, fn.name, fn.op_type, depth[fn.name])
            continue
        _absorb(fn, fp32, tm, key, fconst, compared, dq_of, depth)
    tm.pairs = list(compared.values())
    _quantized_inputs(tm, g)
    _check_related(tm, n_compute)
    return tm


def _absorb(fn, fp32: Model, tm: TensorMap, key, fconst, compared, dq_of, depth) -> None:
    acts = [i for i in fn.input if i and i not in fconst]
    src = tm.sources.get(acts[0]) if len(acts) == 1 and key is not None else None
    if src is not None and (fn.op_type in _NOOP_OPS or is_precision_cast(fn, fp32.tensor_types)):
        tm.sources[fn.output[0]] = src
        tm.skipped[fn.output[0]] = f"'{fn.name}' ({fn.op_type}) is absent from the Q/DQ model; same values as its input"
        return
    if src is not None and fn.op_type in _FOLDABLE_OPS:
        prod = fp32.producers.get(acts[0])
        if prod is not None and prod.name in tm.nodes:
            tm.sources[fn.output[0]] = src
            tm.folded[fn.name] = prod.name
            compared.pop(acts[0], None)
            tm.skipped[acts[0]] = f"BatchNormalization '{fn.name}' is folded into '{prod.name}' in the Q/DQ model"
            compared[fn.output[0]] = TensorPair(fn.output[0], src, fn.name, fn.op_type, depth[fn.name],
                                                note=f"folded into '{prod.name}'")
            return
    if src is not None and fn.op_type in _FUSABLE_ACTIVATIONS:
        tm.sources[fn.output[0]] = src
        dq = dq_of.get(src)
        if dq is not None:
            compared[fn.output[0]] = TensorPair(fn.output[0], dq, fn.name, fn.op_type, depth[fn.name],
                                                note="fused into QuantizeLinear (its range clips)")
        else:
            tm.skipped[fn.output[0]] = f"'{fn.name}' ({fn.op_type}) was removed from the Q/DQ model"
        return
    tm.unmatched.append(fn.name)
    for o in fn.output:
        if o:
            tm.skipped[o] = f"node '{fn.name}' ({fn.op_type}) has no counterpart in the Q/DQ model"


def _quantized_inputs(tm: TensorMap, g: _QdqGraph) -> None:
    qnodes = tm.qdq.nodes
    for fname, qname in tm.nodes.items():
        qn = qnodes[qname]
        ins = []
        for k, t in enumerate(qn.input):
            if not t or g.producer.get(t) is None:
                continue
            src, chain = g.source(t)
            if not any(qnodes[c].op_type == "DequantizeLinear" for c in chain):
                continue
            is_weight = src is None or src in g.const
            ins.append(QdqInput(k, t, None if src is None else g.quantized_input(t) or src, chain, is_weight,
                                value=src))
        if ins:
            tm.quantized[fname] = ins


def _check_io(fp32: Model, qdq: Model) -> None:
    fi = {i.name: i for i in fp32.inputs}
    qi = {i.name: i for i in qdq.inputs}
    if set(fi) != set(qi):
        raise ModelError(
            f"the models' inputs differ: FP32 has {sorted(fi)}, Q/DQ has {sorted(qi)}",
            hint="compare a Q/DQ model exported from this FP32 model")
    for name, a in fi.items():
        b = qi[name]
        if a.dtype != b.dtype or len(a.shape) != len(b.shape) or any(
                x is not None and y is not None and x != y for x, y in zip(a.shape, b.shape)):
            raise ModelError(f"input '{name}' differs: FP32 {a.describe()}, Q/DQ {b.describe()}",
                             hint="compare a Q/DQ model exported from this FP32 model")
    fo, qo = fp32.output_names, qdq.output_names
    if fo != qo:
        raise ModelError(f"the models' outputs differ: FP32 has {fo}, Q/DQ has {qo}",
                         hint="compare a Q/DQ model exported from this FP32 model")


def _check_related(tm: TensorMap, n_compute: int) -> None:
    if n_compute == 0:
        return
    share = len(tm.nodes) / n_compute
    if share < MIN_MATCHED_FRACTION:
        first = tm.unmatched[0] if tm.unmatched else "?"
        node = tm.fp32.nodes.get(first)
        op = node.op_type if node is not None else "?"
        raise ModelError(
            f"the Q/DQ model does not derive from the FP32 model: only {len(tm.nodes)} of {n_compute} FP32 nodes "
            f"have a counterpart (first without one: '{first}' ({op})), so no tensor map can be built",
            hint="pass the FP32 model the Q/DQ model was exported from")
    if tm.unmatched:
        log.warning("%d FP32 nodes have no counterpart in the Q/DQ model (first: %s); their tensors are skipped",
                    len(tm.unmatched), tm.unmatched[0])


def fold_bn_into(weight: np.ndarray, bias: np.ndarray | None, bn: onnx.NodeProto, fp32: Model
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Fold BatchNormalization parameters into a Conv weight and bias (float64 maths, float32 out)."""
    gamma, beta, mean, var = (fp32.weight(t) for t in bn.input[1:5])
    return fold_bn(weight, bias, gamma, beta, mean, var, float(attr(bn, "epsilon", 1e-5)))


def float_constant(tm: TensorMap, fp32_node: str, qin: QdqInput) -> np.ndarray | None:
    """The float value a quantized constant input would have without quantization, or None if unknown.

    ``Q(W_float) -> DQ`` gives ``W_float``; ``DQ(W_int8)`` takes the FP32 node's own
    input at the same position (with a folded BatchNormalization applied).
    """
    if qin.source is not None:
        arr = tm.qdq.weight(qin.source)
        if arr is not None:
            return arr
    fn = tm.fp32.nodes[fp32_node]
    if qin.index >= len(fn.input) or not fn.input[qin.index]:
        arr = None
    else:
        arr = tm.fp32.weight(fn.input[qin.index])
    bn_name = next((b for b, p in tm.folded.items() if p == fp32_node), None)
    if bn_name is None:
        return arr
    if fn.op_type != "Conv":
        return None
    w = tm.fp32.weight(fn.input[1])
    b = tm.fp32.weight(fn.input[2]) if len(fn.input) > 2 and fn.input[2] else None
    wf, bf = fold_bn_into(w, b, tm.fp32.nodes[bn_name], tm.fp32)
    return wf if qin.index == 1 else bf if qin.index == 2 else None

