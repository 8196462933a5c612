"""Facts about an ONNX graph that several stages need, computed one way.

Indexes (``producers``, ``consumers``), topological ``node_depth``, which tensors are
``constant_tensors`` (computed from initializers only), the Q/DQ and Cast op sets (a Cast between
float dtypes, ``is_precision_cast``, is what an FP16/BF16 remainder adds at region boundaries), node
attributes, folding ``Constant`` nodes into initializers, and the BatchNormalization
fold arithmetic (``fold_bn``) that both the ``ort`` export (``calib.export.fold``) and
the FP32/Q/DQ pairing (``calib.compare.mapping``) use. Plain functions over protos:
no calib imports, so every layer may use them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["QDQ_OPS", "CAST_OPS", "FLOAT_TYPES", "is_precision_cast", "attr", "producers", "consumers", "node_depth", "constant_tensors", "constant_value",
           "fold_constant_nodes", "name_nodes", "fold_bn"]

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# A Cast between float dtypes changes precision, not the value's meaning: the FP16/BF16 remainder
# (calib.export.precision) inserts them at region boundaries; pairing and grouping see through them.
CAST_OPS = frozenset({"Cast"})
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                         onnx.TensorProto.DOUBLE})


def is_precision_cast(node: onnx.NodeProto, types: dict[str, int] | None = None) -> bool:
    """A ``Cast`` to a float dtype whose input is float too (an input of unknown type counts as float)."""
    if node.op_type not in CAST_OPS or attr(node, "to") not in FLOAT_TYPES or not node.input:
        return False
    et = (types or {}).get(node.input[0])
    return not et or et in FLOAT_TYPES


def attr(node: onnx.NodeProto, name: str, default=None):
    """The value of attribute ``name`` of ``node`` (``default`` when it is not set)."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it."""
    return {o: n for n in graph.node for o in n.output if o}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it (in graph order; a node reading it twice is listed twice)."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            if i:
                out.setdefault(i, []).append(n)
    return out


def node_depth(graph: onnx.GraphProto) -> dict[str, int]:
    """Topological depth of every node: 1 + the deepest producer of its inputs (graph inputs are 0).

    ONNX requires nodes in topological order (``calib.model`` checks it at load).
    """
    tensor_depth: dict[str, int] = {}
    depth: dict[str, int] = {}
    for n in graph.node:
        d = 1 + max((tensor_depth.get(i, 0) for i in n.input if i), default=0)
        depth[n.name] = d
        for o in n.output:
            tensor_depth[o] = d
    return depth


def constant_tensors(graph: onnx.GraphProto, *, constant_nodes: bool = False) -> set[str]:
    """Initializers and every tensor computed only from them (constant propagation in graph order).

    ``constant_nodes``: also count the outputs of ``Constant`` nodes (a loaded ``Model`` has
    folded them into initializers already; a Q/DQ model from elsewhere may not have).
    """
    const = {t.name for t in graph.initializer}
    for n in graph.node:
        if (constant_nodes and n.op_type == "Constant") or (n.input and all((not i) or i in const for i in n.input)):
            const.update(o for o in n.output if o)
    return const


def constant_value(n: onnx.NodeProto) -> np.ndarray | None:
    """The value of a ``Constant`` node, or None for a kind calib does not read (e.g. sparse)."""
    for a in n.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


def fold_constant_nodes(proto: onnx.ModelProto) -> int:
    """Move ``Constant`` nodes' values into initializers, in place (Paddle exports keep weights there)."""
    g = proto.graph
    keep = []
    folded = 0
    for n in g.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.output) == 1:
            arr = constant_value(n)
            if arr is not None:
                g.initializer.append(numpy_helper.from_array(arr, n.output[0]))
                folded += 1
                continue
        keep.append(n)
    if folded:
        del g.node[:]
        g.node.extend(keep)
    return folded


def name_nodes(proto: onnx.ModelProto) -> dict[str, str]:
    """Give every node a unique name, in place (``exclude`` and reports address nodes by name); returns new -> old
    for renamed duplicates, so ``exclude`` of a duplicated name reaches every node that had it."""
    renamed: dict[str, str] = {}
    used = {n.name for n in proto.graph.node if n.name}
    seen: set[str] = set()
    for i, n in enumerate(proto.graph.node):
        if n.name and n.name not in seen:
            seen.add(n.name)
            continue
        base = f"{n.op_type}_{i}" if not n.name else f"{n.name}_{i}"
        name = base
        k = 0
        while name in used or name in seen:
            k += 1
            name = f"{base}_{k}"
        if n.name:
            renamed[name] = n.name
        n.name = name
        seen.add(name)
    return renamed


def fold_bn(weight: np.ndarray, bias: np.ndarray | None, gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray,
            var: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """A Conv's (weight, bias) with the BatchNormalization after it folded in (float64 maths, float32 out).

    ``s = gamma / sqrt(var + eps)``; ``W' = W * s`` per output channel (axis 0); ``b' = (b - mean) * s + beta``.
    """
    g, bt, mu, v = (np.asarray(a, dtype=np.float64) for a in (gamma, beta, mean, var))
    s = g / np.sqrt(v + eps)
    w = weight.astype(np.float64) * s.reshape(-1, *([1] * (weight.ndim - 1)))
    b = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
    return w.astype(np.float32), ((b - mu) * s + bt).astype(np.float32)
