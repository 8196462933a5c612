"""High-precision remainder of a Q/DQ model: cast everything that is not INT8 to FP16 or BF16.

On TensorRT 11 strong typing is always on: the ONNX types alone decide each
layer's precision, so an FP32 remainder runs in FP32 (TENSORRT.md §4-5).
``cast_remainder`` rewrites a copy of a Q/DQ model so that float32
initializers of cast nodes are converted (a weight shared with an FP32 node is
duplicated), Q/DQ scales take the dtype of the tensor they quantize (opset
>= 19, raised with ``onnx.version_converter``; a Q/DQ pair follows the node it
feeds), and Casts appear only at region boundaries, after float32 graph
inputs and before float32 graph outputs (graph I/O names and dtypes kept).

Keep-FP32 rule, per node (``fp32_nodes``): ``keep_fp32`` (node names or op
types) always; any float input/output whose statistics (exact min/max from
``ActivationStats``) exceed the dtype's max / ``headroom``; a float
initializer beyond that limit; an op the ONNX schema does not allow in the
dtype at the model's opset; an op in ``RANGE_OPS`` (reductions, Softmax, Exp,
Pow, normalizations) with no statistics for its tensors ("cannot show it
fits"; ``range_ops=()`` drops this conservative rule).

ONNX Runtime's CPU provider has few FP16 kernels and inserts casts around the
others, so a CPU run checks the FP16 rounding of every tensor between nodes,
not FP16 arithmetic inside kernels; TensorRT's FP16 kernels are not exercised.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, version_converter

from calib.errors import ConfigError, ModelError
from calib.export.qdq import _Names
from calib.graph import QDQ_OPS

__all__ = ["HIGH_PRECISION", "TARGET_RUNTIMES", "RANGE_OPS", "PrecisionResult", "cast_remainder",
           "fp32_nodes", "profile", "resolve_target", "apply_high_precision"]

HIGH_PRECISION = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
# --target-runtime: one name sets placement and remainder dtype together.
TARGET_RUNTIMES = {"trt": ("trt", "fp16"), "ort": ("ort", "fp32")}
RANGE_OPS = ("Softmax", "LogSoftmax", "ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1", "ReduceL2",
             "ReduceLogSum", "ReduceLogSumExp", "ReduceProd", "Exp", "Pow", "CumSum", "LayerNormalization",
             "InstanceNormalization", "GroupNormalization", "LpNormalization")
_NUMPY = {TensorProto.FLOAT16: np.float16}
_MAX = {TensorProto.FLOAT16: float(np.finfo(np.float16).max), TensorProto.BFLOAT16: 3.3895313892515355e38}
_TINY = {TensorProto.FLOAT16: float(np.finfo(np.float16).tiny), TensorProto.BFLOAT16: 1.1754943508222875e-38}
_KEEP_FLOAT_INPUTS = {"Resize": {2}, "Upsample": {1}}  # inputs whose schema allows float32 only
_OPSET = {"fp16": 19, "bf16": 22}  # float16 Q/DQ scales need opset 19; bfloat16 Conv/MatMul/... need 22
_TYPE_STR = {TensorProto.FLOAT16: "tensor(float16)", TensorProto.BFLOAT16: "tensor(bfloat16)"}


@dataclass
class PrecisionResult:
    """The cast model, the nodes kept FP32 with the reason, and the Cast nodes added."""

    model: onnx.ModelProto
    dtype: str
    kept_fp32: dict[str, str] = field(default_factory=dict)
    casts: list[str] = field(default_factory=list)
    opset_upgraded: bool = False

    def summary(self) -> str:
        return (f"{self.dtype} remainder: {len(self.kept_fp32)} node(s) kept FP32, {len(self.casts)} Cast(s) at "
                f"region boundaries" + (f", opset raised to {_opset(self.model)}" if self.opset_upgraded else ""))


def profile(target_runtime: str) -> tuple[str, str]:
    """(placement, high-precision dtype) of a target runtime: trt -> ('trt', 'fp16'), ort -> ('ort', 'fp32')."""
    if target_runtime not in TARGET_RUNTIMES:
        raise ConfigError(f"--target-runtime {target_runtime}: expected one of {', '.join(TARGET_RUNTIMES)}")
    return TARGET_RUNTIMES[target_runtime]


def resolve_target(target_runtime: str | None, placement: str | None,
                   high_precision: str | None) -> tuple[str, str]:
    """(placement, dtype) from the CLI/config: explicit values win over the ``target_runtime`` profile.

    Without a target runtime the placement names the profile: TensorRT (the
    default) -> fp16 remainder (what TensorRT 11's strong typing needs for the
    float part to run in FP16, and ModelOpt's default), ``--placement ort`` ->
    fp32 (ONNX Runtime's CPU provider has few FP16 kernels). ``--high-precision``
    always wins.
    """
    if target_runtime is None and placement is not None and placement not in TARGET_RUNTIMES:
        raise ConfigError(f"--placement {placement}: expected one of {', '.join(TARGET_RUNTIMES)}")
    p, d = profile(target_runtime if target_runtime is not None else (placement or "trt"))
    d = high_precision or d
    if d not in HIGH_PRECISION:
        raise ConfigError(f"--high-precision {d}: expected one of {', '.join(HIGH_PRECISION)}")
    return placement or p, d


def apply_high_precision(qdq, dtype: str, *, stats: Any = None, keep_fp32: Iterable[str] = (),
                         range_ops: Iterable[str] = RANGE_OPS, headroom: float = 2.0):
    """``cast_remainder`` on a ``QdqModel``: returns (a QdqModel holding the cast model, PrecisionResult).

    Call it last, after bias correction and advise (they run the FP32-remainder
    model); then write the model, ``model_cache`` and ``scale_report`` from the result.
    """
    r = cast_remainder(qdq.model, dtype, stats=stats, keep_fp32=keep_fp32, range_ops=range_ops, headroom=headroom)
    return dataclasses.replace(qdq, model=r.model), r


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor (ONNX shape inference; graph inputs/outputs and initializers too)."""
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    g = inferred.graph
    out = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output) + list(g.value_info)}
    out.update({t.name: t.data_type for t in g.initializer})
    return out


def _stat_max(stats: Any, tensor: str) -> float | None:
    h = getattr(stats, "tensors", {}).get(tensor) if stats is not None else None
    if h is None or not getattr(h, "n", 0):
        return None
    return max(abs(float(h.min)), abs(float(h.max)))


def _keep_reason(node: onnx.NodeProto, fp32_names: dict[str, str], stats: Any, limit: float,
                 inits: Mapping[str, np.ndarray], range_ops: frozenset[str], keep: frozenset[str]) -> str | None:
    if node.name in keep or node.op_type in keep:
        return "keep_fp32 (user list)"
    tensors = [t for t in list(node.input) + list(node.output) if t and fp32_names.get(t) == "float"]
    seen = False
    for t in tensors:
        if t in inits:
            big = float(np.max(np.abs(inits[t]))) if inits[t].size else 0.0
            if big > limit:
                return f"initializer '{t}' holds |x| = {big:.4g} > {limit:.4g}"
            continue
        m = _stat_max(stats, t)
        seen = seen or m is not None
        if m is not None and m > limit:
            return f"tensor '{t}' reaches |x| = {m:.4g} in the statistics > {limit:.4g}"
    if node.op_type in range_ops and not seen:
        return f"{node.op_type} can leave the low-precision range and no statistics show it fits"
    return None


def _lacks_type(node: onnx.NodeProto, opset: int, dt: int) -> bool:
    """True when the op's schema at ``opset`` takes float32 but not ``dt`` (e.g. most ops and bf16 before 22)."""
    if node.domain not in ("", "ai.onnx"):
        return False
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        return False
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    used = []
    for formals, actual in ((schema.inputs, node.input), (schema.outputs, node.output)):
        for i, t in enumerate(actual):
            if t and formals:
                used.append(formals[min(i, len(formals) - 1)].type_str)
    sets = [allowed[u] for u in used if u in allowed]  # a fixed type (Resize's float scales) stays as it is
    return any("tensor(float)" in a and _TYPE_STR[dt] not in a for a in sets)


def fp32_nodes(proto: onnx.ModelProto, dtype: str = "fp16", *, stats: Any = None,
               keep_fp32: Iterable[str] = (), range_ops: Iterable[str] = RANGE_OPS,
               headroom: float = 2.0) -> dict[str, str]:
    """Node name -> why it stays FP32 when the remainder is cast to ``dtype`` (the rule in the module doc)."""
    if dtype not in HIGH_PRECISION:
        raise ConfigError(f"high precision '{dtype}': expected one of {', '.join(HIGH_PRECISION)}")
    if dtype == "fp32":
        return {}
    elif headroom < 1:
        raise ConfigError(f"headroom {headroom}: expected >= 1")
    limit = _MAX[HIGH_PRECISION[dtype]] / headroom
    types = _types(proto)
    kinds = {t: ("float" if ty == TensorProto.FLOAT else "other") for t, ty in types.items()}
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT}
    keep, rops = frozenset(keep_fp32), frozenset(range_ops)
    out, opset, dt = {}, _opset(proto), HIGH_PRECISION[dtype]
    for n in proto.graph.node:
        if n.op_type in QDQ_OPS:
            continue
        why = _keep_reason(n, kinds, stats, limit, inits, rops, keep)
        if why is None and _lacks_type(n, opset, dt):
            why = f"{n.op_type} has no {dtype} kernel in ONNX opset {opset}"
        if why:
            out[n.name] = why
    return out


def _low_tensor(name: str, arr: np.ndarray, dt: int) -> onnx.TensorProto:
    a = np.clip(arr.astype(np.float32), -_MAX[dt], _MAX[dt])
    if dt in _NUMPY:
        return numpy_helper.from_array(a.astype(_NUMPY[dt]), name)
    return helper.make_tensor(name, dt, a.shape, a.ravel().tolist())


def _floored_scale(name: str, arr: np.ndarray, dt: int) -> onnx.TensorProto:
    """A Q/DQ scale in ``dt``, floored at that dtype's smallest normal value (a scale must stay > 0)."""
    t = _low_tensor(name, arr, dt)
    low = numpy_helper.to_array(t).astype(np.float32)
    if np.any(low < _TINY[dt]):
        t = _low_tensor(name, np.maximum(low, _TINY[dt]), dt)
    return t


class _Rewriter:
    """Walks the nodes in order, tracking each float tensor's current dtype, and inserts boundary Casts."""

    def __init__(self, proto: onnx.ModelProto, dt: int, kept: Mapping[str, str]) -> None:
        self.g, self.dt, self.kept = proto.graph, dt, kept
        self.types = _types(proto)
        self.inits = {t.name: t for t in self.g.initializer}
        self.cur: dict[str, int] = {v.name: TensorProto.FLOAT for v in self.g.input if v.name not in self.inits}
        self.region: dict[str, int] = {}
        self.names = _Names(proto)  # unique new tensor/node names, as the Q/DQ export makes them
        self.casts: dict[tuple[str, int], str] = {}
        self.cast_names: list[str] = []
        self.init_copies: dict[tuple[str, int], str] = {}
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.g.node:
            for t in n.input:
                self.consumers.setdefault(t, []).append(n)

    def fresh(self, base: str) -> str:
        return self.names.new(base)

    def node_region(self, n: onnx.NodeProto) -> int:
        """A Q/DQ pair takes the precision of the node it feeds (so DQ -> op still fuses); others: kept or low."""
        if n.name in self.kept:
            return TensorProto.FLOAT
        if n.op_type == "DequantizeLinear" and n.input[0] in self.producer:  # follows its Q
            return self.region.get(self.producer[n.input[0]].name, self.dt)
        if n.op_type in QDQ_OPS:
            dqs = [c for c in self.consumers.get(n.output[0], []) if c.op_type == "DequantizeLinear"] \
                if n.op_type == "QuantizeLinear" else [n]
            users = [u for d in dqs for u in self.consumers.get(d.output[0], [])]
            if users and all(u.name in self.kept for u in users):
                return TensorProto.FLOAT
        return self.dt

    def cast(self, tensor: str, to: int, out: list[onnx.NodeProto]) -> str:
        key = (tensor, to)
        if key not in self.casts:
            name = self.fresh(f"{tensor}_{'fp32' if to == TensorProto.FLOAT else 'cast'}")
            node = helper.make_node("Cast", [tensor], [name], name=self.fresh(f"{tensor}_Cast"), to=to)
            out.append(node)
            self.cast_names.append(node.name)
            self.casts[key] = name
        return self.casts[key]

    def init_for(self, name: str, region: int, n: onnx.NodeProto, idx: int) -> str:
        if region == TensorProto.FLOAT:
            return name
        key = (name, region)
        if key not in self.init_copies:
            arr = numpy_helper.to_array(self.inits[name])
            new = self.fresh(f"{name}_{'bf16' if region == TensorProto.BFLOAT16 else 'fp16'}")
            is_scale = n.op_type in QDQ_OPS and idx == 1
            t = _floored_scale(new, arr, region) if is_scale else _low_tensor(new, arr, region)
            self.g.initializer.append(t)
            self.init_copies[key] = new
            if is_scale and n.op_type == "DequantizeLinear" and n.input[0] in self.inits:
                self._requantize(n, arr, numpy_helper.to_array(t).astype(np.float32))
        return self.init_copies[key]

    def _requantize(self, dq: onnx.NodeProto, old: np.ndarray, new: np.ndarray) -> None:
        """Keep q * scale where the low-precision scale moved (floored), for an int8 weight behind ``dq``."""
        q = numpy_helper.to_array(self.inits[dq.input[0]])
        if np.array_equal(old.astype(np.float32), new) or q.dtype != np.int8:
            return
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [-1 if d == axis % max(q.ndim, 1) else 1 for d in range(q.ndim)] if old.size > 1 else []
        ratio = old.astype(np.float64).reshape(-1) / new.astype(np.float64).reshape(-1)
        r = ratio.reshape(shape) if shape else ratio[0]
        q2 = np.clip(np.rint(q.astype(np.float64) * r), -127, 127).astype(np.int8)
        name = self.fresh(f"{dq.input[0]}_requant")
        self.g.initializer.append(numpy_helper.from_array(q2, name))
        dq.input[0] = name

    def visit(self, n: onnx.NodeProto, out: list[onnx.NodeProto]) -> None:
        region = self.node_region(n)
        self.region[n.name] = region
        exempt = _KEEP_FLOAT_INPUTS.get(n.op_type, set())
        for i, t in enumerate(n.input):
            if not t or self.types.get(t) != TensorProto.FLOAT:
                continue
            want = TensorProto.FLOAT if i in exempt else region
            if t in self.inits:
                n.input[i] = self.init_for(t, want, n, i)
            elif self.cur.get(t, TensorProto.FLOAT) != want:
                n.input[i] = self.cast(t, want, out)
        if region != TensorProto.FLOAT:
            self._retype_attributes(n, region)
        for o in n.output:
            if o and self.types.get(o) == TensorProto.FLOAT:
                self.cur[o] = region
        out.append(n)

    def _retype_attributes(self, n: onnx.NodeProto, region: int) -> None:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = region
            elif n.op_type in ("Constant", "ConstantOfShape") and a.name == "value" and \
                    a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(_low_tensor(a.t.name, numpy_helper.to_array(a.t), region))
        if n.op_type == "ConstantOfShape" and not any(a.name == "value" for a in n.attribute):
            n.attribute.append(helper.make_attribute("value", _low_tensor("value", np.zeros(1, np.float32), region)))

    def outputs(self, out: list[onnx.NodeProto]) -> None:
        """A graph output declared float32 but produced in low precision: rename inside, Cast back to its name."""
        inputs = {v.name for v in self.g.input}
        for v in self.g.output:
            o = v.name
            if v.type.tensor_type.elem_type != TensorProto.FLOAT or o in inputs or self.cur.get(o) != self.dt:
                continue
            inner = self.fresh(f"{o}_{'bf16' if self.dt == TensorProto.BFLOAT16 else 'fp16'}")
            for n in out:
                for k, t in enumerate(n.input):
                    if t == o:
                        n.input[k] = inner
                for k, t in enumerate(n.output):
                    if t == o:
                        n.output[k] = inner
            node = helper.make_node("Cast", [inner], [o], name=self.fresh(f"{o}_Cast"), to=TensorProto.FLOAT)
            out.append(node)
            self.cast_names.append(node.name)

    def tidy_initializers(self, nodes: list[onnx.NodeProto]) -> None:
        """Drop float initializers no node reads any more; a copy whose original went takes back its name."""
        used = {t for n in nodes for t in n.input} | {v.name for v in self.g.output}
        rename = {new: old for (old, _r), new in self.init_copies.items()
                  if old not in used and sum(1 for (o, _x) in self.init_copies if o == old) == 1}
        keep = []
        for t in self.g.initializer:
            if t.name not in used:
                continue
            if t.name in rename:
                t.name = rename[t.name]
            keep.append(t)
        del self.g.initializer[:]
        self.g.initializer.extend(keep)
        for n in nodes:
            for k, t in enumerate(n.input):
                if t in rename:
                    n.input[k] = rename[t]
        graph_in = [v for v in self.g.input if v.name not in self.inits or v.name in used or v.name in rename.values()]
        del self.g.input[:]
        self.g.input.extend(graph_in)


def cast_remainder(proto: onnx.ModelProto, dtype: str = "fp16", *, stats: Any = None,
                   keep_fp32: Iterable[str] = (), range_ops: Iterable[str] = RANGE_OPS,
                   headroom: float = 2.0) -> PrecisionResult:
    """Cast the non-INT8 remainder of a Q/DQ model (a copy of ``proto``) to ``dtype`` (fp16 | bf16 | fp32).

    ``stats``: the ``ActivationStats`` the model was calibrated with (exact
    min/max per tensor) to find tensors the low dtype cannot hold;
    ``keep_fp32``: node names or op types forced to FP32; ``range_ops``: op
    types kept FP32 unless statistics show their tensors fit; ``headroom``:
    a tensor must stay below the dtype's max / headroom (unseen data can reach further).
    """
    if dtype not in HIGH_PRECISION:
        raise ConfigError(f"--high-precision {dtype}: expected one of {', '.join(HIGH_PRECISION)}")
    work = onnx.ModelProto()
    work.CopyFrom(proto)
    if dtype == "fp32":
        return PrecisionResult(work, dtype)
    upgraded = _opset(work) < _OPSET[dtype]
    if upgraded:
        try:
            work = version_converter.convert_version(work, _OPSET[dtype])
        except Exception as e:  # the converter raises plain RuntimeError/ValidationError
            raise ModelError(f"cannot raise the model to opset {_OPSET[dtype]} for {dtype} Q/DQ scales: {e}",
                             hint="export the model at opset >= 19, or use --high-precision fp32") from None
    kept = fp32_nodes(work, dtype, stats=stats, keep_fp32=keep_fp32, range_ops=range_ops, headroom=headroom)
    rw = _Rewriter(work, HIGH_PRECISION[dtype], kept)
    out: list[onnx.NodeProto] = []
    for n in list(work.graph.node):
        rw.visit(n, out)
    rw.outputs(out)
    rw.tidy_initializers(out)
    del work.graph.node[:]
    work.graph.node.extend(out)
    del work.graph.value_info[:]
    try:
        onnx.checker.check_model(work, full_check=True)
    except Exception as e:  # a bug in calib, not bad input
        raise RuntimeError(f"the {dtype} model fails onnx.checker: {e}") from e
    return PrecisionResult(work, dtype, kept_fp32=kept, casts=rw.cast_names, opset_upgraded=upgraded)
