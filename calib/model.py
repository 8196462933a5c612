"""Read-only view of an FP32 ONNX model.

``load_model`` reads a file without ever writing to it, checks it with
``onnx.checker`` on the path (so external data is checked too), refuses external
data outside the model's folder, and builds a *working copy*: opset upgraded to
at least 13 (per-channel DequantizeLinear needs the ``axis`` attribute), weights
held in ``Constant`` nodes folded into initializers, unnamed nodes named,
``metadata_props`` kept. Every later stage edits copies of ``Model.proto``.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calib.errors import ModelError
from calib.io import sha256_file
from calib.graph import constant_tensors, consumers, fold_constant_nodes, name_nodes, node_depth, producers
from calib.model_guard import lift_ir3

__all__ = [
    "InputSpec",
    "Model",
    "load_model",
    "model_from_proto",
    "as_model",
    "as_qdq_model",
    "WEIGHTED_OPS",
    "QUANTIZABLE_OPS",
    "MIN_OPSET",
    "TARGET_OPSET",
]

log = logging.getLogger(__name__)

MIN_OPSET = 13
TARGET_OPSET = 17
# ONNX Runtime 1.2x/1.3x accept IR version <= 10 for every opset we emit.
MAX_IR_VERSION = 10

WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# Ops whose float inputs either placement (TensorRT's rules or ONNX Runtime's
# fusions) may quantize; statistics are collected for their activation inputs and outputs.
# It holds every op of the ort placement (calib.export.placement.ORT_INT8_OPS; a test checks),
# Squeeze/Unsqueeze/Slice included: without them the ort placement asked for ranges of tensors
# never collected (magika: LayerNorm -> Unsqueeze -> Slice -> Conv -> Slice -> Squeeze).
QUANTIZABLE_OPS = WEIGHTED_OPS | frozenset(
    {
        "Add",
        "Sub",
        "Mul",
        "Concat",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "Resize",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Relu",
        "Clip",
        "LeakyRelu",
        "Softmax",
        "ReduceMean",
        "Transpose",
        "Reshape",
        "Flatten",
        "Split",
        "Slice",
        "Squeeze",
        "Unsqueeze",
        "Pad",
        "Tanh",
        "Gelu",
        "LayerNormalization",
        "InstanceNormalization",
        "Div",
    }
)

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
_SUBGRAPH_OPS = {"If", "Loop", "Scan"}


@dataclass(frozen=True)
class InputSpec:
    """A graph input: ``shape`` holds ints for fixed dims and ``None`` for symbolic ones."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype

    @property
    def is_float(self) -> bool:
        return np.issubdtype(self.dtype, np.floating)

    def describe(self) -> str:
        dims = ", ".join("N" if d is None else str(d) for d in self.shape)
        return f"({dims}) {self.dtype}"


@dataclass
class Model:
    """A working copy of an FP32 model plus indexes over it.

    ``proto`` is never the object read from disk's bytes; edit copies of it
    (``copy_proto``) in later stages.
    """

    proto: onnx.ModelProto
    path: Path | None = None
    sha256: str = ""
    notes: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)  # unique node name -> the duplicate name it had

    # ---- indexes -------------------------------------------------------
    @property
    def graph(self) -> onnx.GraphProto:
        return self.proto.graph

    def copy_proto(self) -> onnx.ModelProto:
        return copy.deepcopy(self.proto)

    @cached_property
    def initializers(self) -> dict[str, onnx.TensorProto]:
        return {t.name: t for t in self.graph.initializer}

    @cached_property
    def nodes(self) -> dict[str, onnx.NodeProto]:
        return {n.name: n for n in self.graph.node}

    @cached_property
    def producers(self) -> dict[str, onnx.NodeProto]:
        return producers(self.graph)

    @cached_property
    def consumers(self) -> dict[str, list[onnx.NodeProto]]:
        return consumers(self.graph)

    @cached_property
    def inputs(self) -> list[InputSpec]:
        init = set(self.initializers)
        specs = []
        for vi in self.graph.input:
            if vi.name in init:
                continue
            tt = vi.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim)
            specs.append(InputSpec(vi.name, dims, helper.tensor_dtype_to_np_dtype(tt.elem_type)))
        return specs

    @cached_property
    def output_names(self) -> list[str]:
        return [o.name for o in self.graph.output]

    @cached_property
    def tensor_types(self) -> dict[str, int]:
        """ONNX element type of every tensor whose type is known after shape inference."""
        types: dict[str, int] = {}
        for vi in list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output):
            et = vi.type.tensor_type.elem_type
            if et:
                types[vi.name] = et
        for t in self.graph.initializer:
            types[t.name] = t.data_type
        return types

    @cached_property
    def tensor_shapes(self) -> dict[str, tuple[int | None, ...]]:
        shapes = {}
        for vi in list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output):
            tt = vi.type.tensor_type
            if tt.HasField("shape"):
                shapes[vi.name] = tuple(
                    d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim
                )
        return shapes

    def is_float(self, tensor: str) -> bool:
        """True if ``tensor`` is known to be float; unknown types count as float (checked at run time)."""
        et = self.tensor_types.get(tensor)
        return et is None or et in _FLOAT_TYPES

    def weight(self, name: str) -> np.ndarray | None:
        t = self.initializers.get(name)
        return None if t is None else numpy_helper.to_array(t)

    @cached_property
    def depth(self) -> dict[str, int]:
        """Topological depth of every node: 1 + the deepest producer of its inputs (inputs are 0)."""
        return node_depth(self.graph)

    @cached_property
    def tensor_depth(self) -> dict[str, int]:
        return {o: self.depth[n.name] for n in self.graph.node for o in n.output if o}

    def activation_tensors(self, op_types: frozenset[str] = QUANTIZABLE_OPS) -> list[str]:
        """Float activation tensors consumed or produced by nodes of ``op_types``, in graph order.

        Initializers, integer tensors (token ids, byte values, shapes) and
        tensors computed only from constants are left out.
        """
        constant = constant_tensors(self.graph)
        seen: dict[str, None] = {}
        for n in self.graph.node:
            if n.op_type not in op_types:
                continue
            # inputs (what TensorRT's placement quantizes) and outputs (what ORT's placement adds);
            # an output read only by BatchNormalization is skipped: BN folds into the op before either
            # placement quantizes its output, so that pre-BN tensor never exists in a quantized model
            outs = [o for o in n.output
                    if not (self.consumers.get(o) and all(c.op_type == "BatchNormalization"
                                                          for c in self.consumers[o]))]
            for i in list(n.input) + outs:
                if i and i not in constant and i not in seen and self.is_float(i):
                    seen[i] = None
        return list(seen)

    def nodes_of(self, op_types: frozenset[str] | set[str]) -> list[onnx.NodeProto]:
        return [n for n in self.graph.node if n.op_type in op_types]

    def weighted_nodes(self) -> list[onnx.NodeProto]:
        """Conv, ConvTranspose, Gemm and MatMul nodes (MatMul with a constant B or not)."""
        return self.nodes_of(WEIGHTED_OPS)


def _check_external_data(proto: onnx.ModelProto, folder: Path, path: Path) -> None:
    root = folder.resolve()
    for t in _all_tensors(proto):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        target = (folder / loc).resolve()
        if os.path.isabs(loc) or (root != target and root not in target.parents):
            raise ModelError(
                f"{path}: tensor '{t.name}' keeps its data at '{loc}', outside the model's folder {root}",
                hint="move the external data file next to the model; calib never reads data outside that folder",
            )


def _all_tensors(proto: onnx.ModelProto):
    yield from proto.graph.initializer
    for n in proto.graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t


def load_model(path: str | os.PathLike, *, check: bool = True) -> Model:
    """Load ``path`` read-only and return a working copy ready for calibration."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file", hint="check the model path")
    if path.is_dir():
        raise ModelError(f"{path}: is a folder, expected an .onnx file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ModelError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})".strip(),
                         hint="is the file truncated or not ONNX?") from None
    if not proto.graph.node:
        raise ModelError(f"{path}: not a readable ONNX model (the graph has no nodes)", hint="is the file ONNX?")
    _check_external_data(proto, path.parent, path)
    if check:
        try:
            onnx.checker.check_model(str(path))
        except Exception as e:
            raise ModelError(f"{path}: onnx.checker rejects the model: {str(e).splitlines()[0]}") from None
    if any(t.data_location == TensorProto.EXTERNAL for t in _all_tensors(proto)):
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
        except (OSError, ValueError) as e:  # e.g. a truncated external-data file
            raise ModelError(f"{path}: cannot read its external data ({str(e).splitlines()[0]})") from None
    return model_from_proto(proto, path=path, _copy=False, _sha256=sha256_file(path))


def model_from_proto(proto: onnx.ModelProto, *, path: Path | None = None, _copy: bool = True,
                     _sha256: str = "") -> Model:
    """Build a working ``Model`` from an in-memory proto (the proto passed in is not changed)."""
    proto = copy.deepcopy(proto) if _copy else proto
    notes: list[str] = []
    _refuse_subgraphs(proto, path)
    renamed = name_nodes(proto)
    folded = fold_constant_nodes(proto)
    if folded:
        notes.append(f"folded {folded} Constant nodes into initializers")
    opset = _default_opset(proto)
    if opset < MIN_OPSET:
        proto = _upgrade(proto, path)
        notes.append(f"upgraded opset {opset} -> {TARGET_OPSET}")
    if 0 < proto.ir_version < 4:
        notes.append(lift_ir3(proto))
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as e:  # shapes are a convenience; types fall back to run time
        log.warning("shape inference failed (%s); tensor types are checked at run time", e)
    if not proto.ir_version:
        proto.ir_version = MAX_IR_VERSION
    m = Model(proto=proto, path=path, notes=notes, renamed=renamed)
    m.sha256 = _sha256
    if not m.sha256:
        m.sha256 = hashlib.sha256(proto.SerializeToString()).hexdigest()
    return m


def _default_opset(proto: onnx.ModelProto) -> int:
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 1


def _upgrade(proto: onnx.ModelProto, path: Path | None) -> onnx.ModelProto:
    from onnx import version_converter

    meta = [(p.key, p.value) for p in proto.metadata_props]
    try:
        up = version_converter.convert_version(proto, TARGET_OPSET)
    except Exception as e:
        raise ModelError(
            f"{path or 'model'}: opset {_default_opset(proto)} is below {MIN_OPSET} and the upgrade "
            f"to {TARGET_OPSET} failed: {str(e).splitlines()[0]}",
            hint="export the model with opset >= 13",
        ) from None
    del up.metadata_props[:]
    for k, v in meta:
        up.metadata_props.add(key=k, value=v)
    return up


def _refuse_subgraphs(proto: onnx.ModelProto, path: Path | None) -> None:
    for n in proto.graph.node:
        if n.op_type in _SUBGRAPH_OPS or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                              for a in n.attribute):
            inner = sum(len(a.g.node) for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)
            inner_w = sum(1 for a in n.attribute if a.type == onnx.AttributeProto.GRAPH
                          for m in a.g.node if m.op_type in WEIGHTED_OPS)
            if inner_w:
                raise ModelError(
                    f"{path or 'model'}: node '{n.name or n.op_type}' ({n.op_type}) holds a subgraph with "
                    f"{inner} nodes, {inner_w} of them Conv/Gemm/MatMul; calib does not calibrate inside subgraphs",
                    hint="export the model without control flow (e.g. unroll the loop) or with a fixed branch",
                )


def as_model(m: Model | str | os.PathLike | onnx.ModelProto) -> Model:
    if isinstance(m, Model):
        return m
    if isinstance(m, onnx.ModelProto):
        return model_from_proto(m)
    return load_model(m)


def as_qdq_model(m: Any) -> Model:
    """Accept a ``QdqModel`` (from ``export_qdq``), a proto, a path or a ``Model``."""
    proto = getattr(m, "model", None)
    if isinstance(proto, onnx.ModelProto):
        return model_from_proto(proto)
    return as_model(m)
