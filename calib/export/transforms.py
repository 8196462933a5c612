"""Function-preserving FP32 transforms that make a model easier to quantize, by editing float weights in place.

Both move per-channel range between an activation tensor ``X`` and the weights that read it: channel
``j`` of ``X`` is divided by ``s_j > 0`` (by editing the parameters of the node that produces it) and
input channel ``j`` of every consumer's weight is multiplied by ``s_j``, so the FP32 function is unchanged
(up to float rounding). No node is added or removed: the model stays a plain graph whose Q/DQ export is
symmetric int8 with zero point 0 and whose TensorRT fusions are those of the original.

    s_j = max|x_j| ** alpha / max|W_j| ** (1 - alpha)        (alpha = 0.5)

``max|x_j|`` is measured on data (per channel of ``X``), ``max|W_j|`` is the largest magnitude of input
channel ``j`` over all consumers' weights. After the transform both equal ``max|x_j| ** a * max|W_j| ** (1-a)``
(for alpha 0.5: ``sqrt(max|x_j| * max|W_j|)``), so a few outlier channels no longer set the per-tensor
activation scale of ``X``. A channel with no activity or no weight keeps ``s_j = 1``.

- ``smoothquant`` (Xiao et al., 2023): ``X`` is the output of a ``LayerNormalization`` (``gamma``,
  ``beta`` divided by ``s``) or of a decomposed one's tail ``Add(Mul(n, gamma), beta)`` with constant
  ``gamma``/``beta`` (both divided), read only by ``MatMul``/``Gemm`` with constant 2-D weights.
- ``equalize`` (cross-layer equalization, Nagel et al. 2019, in its data-aware form): ``X`` is the
  input of ``Conv`` consumers (constant weights, any ``group``: depthwise -> pointwise included) and is
  ``act(P)`` where ``P`` is a ``Conv`` (weight rows and bias divided) or a ``BatchNormalization``
  (scale and bias divided) and ``act`` is positively homogeneous, ``act(p / s) = act(p) / s`` for every
  ``s > 0``: none (identity), ``Relu``, ``LeakyRelu``, or ``Clip`` with min 0 and no max. With per-channel
  weight scales (calib's default) the first layer's weights quantize the same whatever ``s``; what is
  balanced is the per-tensor activation between the layers against the second layer's input channels.
  **ReLU6 (``Clip`` with a finite max) is never crossed**: ``clip(p / s, 0, 6) = clip(p, 0, 6 s) / s``,
  which equals ``clip(p, 0, 6) / s`` for every ``p`` only when ``s = 1`` (neither ``s >= 1`` nor
  ``s <= 1`` keeps it: values between 6 and ``6 s`` pass, or values between ``6 s`` and 6 clip early), and
  Clip's bounds are scalars, so a per-channel ``s`` cannot be moved into them without new nodes.

No tensor that is a graph output, nor one read by another node than those named, is ever divided.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["Site", "find_sites", "migration_scales", "apply_sites", "TRANSFORM_KINDS", "ALPHA"]

ALPHA = 0.5
TRANSFORM_KINDS = ("equalize", "smoothquant")
_HOMOGENEOUS = ("Relu", "LeakyRelu")
S_MIN, S_MAX = 1e-4, 1e4


@dataclass
class Site:
    """One place a transform applies: channels of ``tensor`` divided through ``producer``'s parameters."""

    kind: str  # equalize | smoothquant
    tensor: str  # what the consumers read (measured per channel)
    axis: int  # its channel axis (1: NCHW; -1: last)
    producer: str  # node whose parameters are divided
    consumers: list[str]  # nodes whose weights are multiplied
    changed: list[str] = field(default_factory=list)  # every tensor whose values change (re-calibrate these)


class _Graph:
    def __init__(self, proto: onnx.ModelProto) -> None:
        g = proto.graph
        self.proto = proto
        self.inits = {t.name: t for t in g.initializer}
        self.prod = {o: n for n in g.node for o in n.output}
        self.users: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in dict.fromkeys(n.input):
                self.users.setdefault(i, []).append(n)
        self.outputs = {o.name for o in g.output}
        self.nodes = {n.name: n for n in g.node}
        self.replaced: set[str] = set()

    def const(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def only_users(self, tensor: str, ops: tuple[str, ...]) -> list[onnx.NodeProto] | None:
        """The nodes reading ``tensor`` when all are of ``ops`` and it is not a graph output; else None."""
        users = self.users.get(tensor, [])
        if tensor in self.outputs or not users or any(u.op_type not in ops for u in users):
            return None
        return users


def _attr(node: onnx.NodeProto, name: str, default):
    a = next((a for a in node.attribute if a.name == name), None)
    return default if a is None else onnx.helper.get_attribute_value(a)


def _conv_consumers(g: _Graph, tensor: str) -> list[onnx.NodeProto] | None:
    users = g.only_users(tensor, ("Conv",))
    if users is None or any(u.input[0] != tensor or u.input[1] not in g.inits for u in users):
        return None
    return users


def _activation_ok(node: onnx.NodeProto, g: _Graph) -> bool:
    if node.op_type in _HOMOGENEOUS:
        return True
    if node.op_type != "Clip":
        return False
    lo = g.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    hi = node.input[2] if len(node.input) > 2 else ""
    return lo is not None and float(lo) == 0.0 and not hi and _attr(node, "max", None) is None


def _equalize_sites(g: _Graph) -> list[Site]:
    out = []
    for p in g.proto.graph.node:
        if p.op_type not in ("Conv", "BatchNormalization") or any(i and i not in g.inits for i in p.input[1:]):
            continue
        pre = p.output[0]
        mid, changed = pre, [pre]
        act = g.only_users(pre, _HOMOGENEOUS + ("Clip",))
        if act is not None and len(act) == 1 and _activation_ok(act[0], g):
            mid, changed = act[0].output[0], [pre, act[0].output[0]]
        elif g.only_users(pre, ("Conv",)) is None:
            continue
        users = _conv_consumers(g, mid)
        if users:
            out.append(Site("equalize", mid, 1, p.name, [u.name for u in users], changed))
    return out


def _matmul_consumers(g: _Graph, tensor: str) -> list[onnx.NodeProto] | None:
    users = g.only_users(tensor, ("MatMul", "Gemm"))
    if users is None:
        return None
    for u in users:
        w = g.const(u.input[1]) if u.input[1] in g.inits else None
        if u.input[0] != tensor or w is None or w.ndim != 2 or (u.op_type == "Gemm" and _attr(u, "transA", 0)):
            return None
    return users


def _smooth_sites(g: _Graph) -> list[Site]:
    out = []
    for p in g.proto.graph.node:
        x = p.output[0] if p.output else ""
        if p.op_type == "LayerNormalization":
            ok = _attr(p, "axis", -1) == -1 and all(i in g.inits for i in p.input[1:3] if i)
        elif p.op_type == "Add":
            ok = _ln_tail(g, p) is not None
        else:
            ok = False
        users = _matmul_consumers(g, x) if ok else None
        if users:
            out.append(Site("smoothquant", x, -1, p.name, [u.name for u in users], [x]))
    return out


def _ln_tail(g: _Graph, add: onnx.NodeProto) -> tuple[onnx.NodeProto, int, int] | None:
    """``Add(Mul(n, gamma), beta)``: (the Mul, index of beta in the Add, index of gamma in the Mul)."""
    for j in (0, 1):
        other = add.input[1 - j]
        mul = g.prod.get(add.input[j])
        if other in g.inits and mul is not None and mul.op_type == "Mul" and len(g.users[mul.output[0]]) == 1 \
                and mul.output[0] not in g.outputs:
            k = next((k for k in (0, 1) if mul.input[k] in g.inits), None)
            if k is not None and g.const(mul.input[k]).ndim == 1 and g.const(other).ndim == 1:
                return mul, 1 - j, k
    return None


def find_sites(proto: onnx.ModelProto, kind: str) -> list[Site]:
    """Every place ``kind`` (``equalize`` or ``smoothquant``) applies in ``proto`` (see the module doc)."""
    g = _Graph(proto)
    return _equalize_sites(g) if kind == "equalize" else _smooth_sites(g)


def _weight_in_absmax(w: np.ndarray, node: onnx.NodeProto, channels: int) -> np.ndarray:
    """max|W| per input channel of a consumer (Conv: [Cout, Cin/g, ..]; MatMul/Gemm: [K, N] or [N, K])."""
    if node.op_type == "Conv":
        group = int(_attr(node, "group", 1))
        cout, cin_g = w.shape[0], w.shape[1]
        a = np.abs(w).reshape(group, cout // group, cin_g, -1).max(axis=(1, 3))  # [group, cin_g]
        return a.reshape(channels)
    trans_b = node.op_type == "Gemm" and _attr(node, "transB", 0)
    return np.abs(w).max(axis=0 if trans_b else 1)


def migration_scales(act_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """``s_j = max|x_j| ** alpha / max|W_j| ** (1 - alpha)``; 1 where either is zero; clipped to [1e-4, 1e4]."""
    a = np.asarray(act_absmax, np.float64)
    w = np.asarray(w_absmax, np.float64)
    ok = (a > 0) & (w > 0) & np.isfinite(a) & np.isfinite(w)
    s = np.ones_like(a)
    s[ok] = a[ok] ** alpha / w[ok] ** (1 - alpha)
    return np.clip(s, S_MIN, S_MAX)


def _set(g: _Graph, node: onnx.NodeProto, idx: int, value: np.ndarray, tag: str) -> None:
    """Point ``node.input[idx]`` at a new initializer holding ``value`` (others reading the old one keep it)."""
    old = g.inits[node.input[idx]]
    name = f"{old.name}_{tag}"
    k = 1
    while name in g.inits:
        name, k = f"{old.name}_{tag}{k}", k + 1
    t = numpy_helper.from_array(value.astype(numpy_helper.to_array(old).dtype), name)
    g.proto.graph.initializer.append(t)
    g.inits[name] = g.proto.graph.initializer[-1]
    g.replaced.add(node.input[idx])
    node.input[idx] = name


def _divide_producer(g: _Graph, p: onnx.NodeProto, s: np.ndarray, tag: str) -> None:
    if p.op_type == "Conv":
        _set(g, p, 1, g.const(p.input[1]) / s.reshape(-1, *[1] * (g.const(p.input[1]).ndim - 1)), tag)
        if len(p.input) > 2 and p.input[2]:
            _set(g, p, 2, g.const(p.input[2]) / s, tag)
    elif p.op_type in ("BatchNormalization", "LayerNormalization"):
        for i in (1, 2):
            if len(p.input) > i and p.input[i]:
                _set(g, p, i, g.const(p.input[i]) / s, tag)
    else:  # the Add of a decomposed LayerNormalization: beta here, gamma in its Mul
        mul, j, k = _ln_tail(g, p)
        _set(g, p, j, g.const(p.input[j]) / s, tag)
        _set(g, mul, k, g.const(mul.input[k]) / s, tag)


def _multiply_consumer(g: _Graph, u: onnx.NodeProto, s: np.ndarray, tag: str) -> None:
    w = g.const(u.input[1]).astype(np.float64)
    if u.op_type == "Conv":
        group = int(_attr(u, "group", 1))
        cout, cin_g = w.shape[0], w.shape[1]
        f = s.reshape(group, 1, cin_g, *[1] * (w.ndim - 2))
        w = (w.reshape(group, cout // group, cin_g, *w.shape[2:]) * f).reshape(w.shape)
    elif u.op_type == "Gemm" and _attr(u, "transB", 0):
        w = w * s[None, :]
    else:
        w = w * s[:, None]
    _set(g, u, 1, w, tag)


def apply_sites(proto: onnx.ModelProto, sites: list[Site], act_absmax: dict[str, np.ndarray],
                alpha: float = ALPHA) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A copy of ``proto`` with every site's channels migrated (``act_absmax``: tensor -> per-channel
    max|x|); also each site's scales ``s`` (by tensor)."""
    out = copy.deepcopy(proto)
    g = _Graph(out)
    scales = {}
    for site in sites:
        users = [g.nodes[n] for n in site.consumers]
        a = np.asarray(act_absmax[site.tensor], np.float64)
        w = np.max([_weight_in_absmax(g.const(u.input[1]), u, a.size) for u in users], axis=0)
        s = migration_scales(a, w, alpha)
        if np.allclose(s, 1.0):
            continue
        _divide_producer(g, g.nodes[site.producer], s, site.kind)
        for u in users:
            _multiply_consumer(g, u, s, site.kind)
        scales[site.tensor] = s
    used = {i for n in out.graph.node for i in n.input}
    for t in [t for t in out.graph.initializer if t.name in g.replaced and t.name not in used]:
        out.graph.initializer.remove(t)  # the parameters the transform replaced
    onnx.checker.check_model(out)
    return out, scales
