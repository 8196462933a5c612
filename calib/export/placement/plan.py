"""The placement's data: ``Plan`` (edges, weight slots, shared scales, what was skipped and why),
``PlacementContext`` (the model and the facts every rule needs), the op sets the rules share, and
``resolve_exclude``. Rules live in ``trt_rules``/``ort_rules``/``common``; drivers in ``__init__``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import onnx

from calib.calibrate.base import TensorRange
from calib.errors import RangesError
from calib.graph import constant_tensors
from calib.model import Model

# Tensors whose calibrated amax exceeds this hold mask-like values (float32 min,
# -1e9 "minus infinity" attention masks): one int8 scale cannot represent them.
HUGE_AMAX = 1e30

# Ops whose inputs and outputs get Q/DQ in the "ort" placement. They are the ops
# onnxruntime/quantization/registry.py quantizes in QDQ mode (QDQRegistry plus
# QLinearOpsRegistry) for which ONNX Runtime's CPU provider has an int8 kernel or
# drops the Q/DQ pair (Reshape-like ops, MaxPool): QLinearConv, QLinearMatMul,
# QGemm, QLinearAdd/Mul, QLinearAveragePool, QLinearGlobalAveragePool,
# QLinearConcat, QLinearSigmoid, QLinearLeakyRelu, QLinearSoftmax. Normalisation
# ops (BatchNormalization, LayerNormalization, InstanceNormalization) are left
# out: there is no CPU int8 kernel, so Q/DQ around them only adds rounding.
ORT_INT8_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "Gemm",
        "MatMul",
        "Add",
        "Mul",
        "AveragePool",
        "GlobalAveragePool",
        "MaxPool",
        "Concat",
        "Sigmoid",
        "LeakyRelu",
        "Relu",
        "Clip",
        "Softmax",
        "Resize",
        "Reshape",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Flatten",
        "Slice",
        "Pad",
        "Split",
    }
)

POOLING_OPS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"})
# Ops that only move data: TensorRT looks through them when it propagates Q/DQ.
COPY_OPS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Slice", "Split",
                      "Gather", "Pad"})
# Ops TensorRT fuses into the preceding Conv/Gemm (looked through to find a residual Add's backbone).
FUSED_EPILOGUE_OPS = frozenset({"BatchNormalization", "Identity", "Relu", "Clip", "LeakyRelu", "HardSwish",
                                "HardSigmoid", "Sigmoid", "Add", "Mul"})


@dataclass(frozen=True)
class Edge:
    """Input ``index`` of node ``node`` reads ``tensor``."""

    tensor: str
    node: str
    index: int


@dataclass(frozen=True)
class WeightSlot:
    """A constant input of a node stored as int8 behind DequantizeLinear.

    ``axis`` is the per-channel axis, or None for one scale for the whole tensor.
    """

    node: str
    index: int
    initializer: str
    axis: int | None


@dataclass
class Plan:
    """What to quantize. ``why`` records which rule added each edge (for tests and reports)."""

    placement: str
    edges: set[Edge] = field(default_factory=set)
    weights: list[WeightSlot] = field(default_factory=list)
    shared: list[list[str]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    why: dict[Edge, str] = field(default_factory=dict)

    def add(self, edge: Edge, rule: str) -> None:
        if edge not in self.edges:
            self.edges.add(edge)
            self.why[edge] = rule

    def drop(self, pred: Callable[[Edge], bool]) -> list[Edge]:
        gone = [e for e in self.edges if pred(e)]
        for e in gone:
            self.edges.discard(e)
            self.why.pop(e, None)
        return gone

    @property
    def tensors(self) -> list[str]:
        """Quantized activation tensors, sorted."""
        return sorted({e.tensor for e in self.edges})

    @property
    def quantized_nodes(self) -> set[str]:
        return {e.node for e in self.edges} | {w.node for w in self.weights}


@dataclass
class PlacementContext:
    """The model plus the facts every rule needs (computed once)."""

    model: Model
    ranges: Mapping[str, TensorRange]
    excluded_nodes: frozenset[str] = frozenset()
    excluded_tensors: frozenset[str] = frozenset()
    flagged: Mapping[str, str] = field(default_factory=dict)  # tensor -> why it must stay float

    def __post_init__(self) -> None:
        m = self.model
        self.constant = constant_tensors(m.graph)
        self.graph_outputs = set(m.output_names)

    def is_activation(self, tensor: str) -> bool:
        return bool(tensor) and tensor not in self.constant and self.model.is_float(tensor)

    def is_weight(self, tensor: str) -> bool:
        return tensor in self.model.initializers and self.model.is_float(tensor)

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        return self.model.producers.get(tensor)

    def consumers(self, tensor: str) -> list[onnx.NodeProto]:
        return self.model.consumers.get(tensor, [])


# ---------------------------------------------------------------- exclude


def resolve_exclude(model: Model, exclude: Iterable[str]) -> tuple[frozenset[str], frozenset[str]]:
    """Turn ``exclude`` items (node names, op types, tensor names) into (nodes, tensors).

    A node name keeps that node float; an op type keeps every node of that type
    float; a tensor name keeps the tensor unquantized and its producer float.
    Unknown names raise ``RangesError`` listing close matches.
    """
    nodes: set[str] = set()
    tensors: set[str] = set()
    op_types = {n.op_type for n in model.graph.node}
    all_tensors = set(model.producers) | {i.name for i in model.graph.input}
    for item in exclude:
        if item in model.nodes or item in model.renamed.values():
            nodes.update([item] if item in model.nodes else [])
            nodes.update(new for new, old in model.renamed.items() if old == item)
        elif item in op_types:
            nodes.update(n.name for n in model.graph.node if n.op_type == item)
        elif item in all_tensors:
            tensors.add(item)
            p = model.producers.get(item)
            if p is not None:
                nodes.add(p.name)
        else:
            pool = list(model.nodes) + sorted(op_types) + sorted(all_tensors)
            close = difflib.get_close_matches(item, pool, n=5, cutoff=0.5)
            near = f"; close matches: {', '.join(repr(c) for c in close)}" if close else ""
            raise RangesError(
                f"exclude '{item}': no node, op type or tensor of that name in the model{near}",
                hint="node and tensor names are the model's ONNX names (as Netron shows them)",
            )
    return frozenset(nodes), frozenset(tensors)


# ---------------------------------------------------------------- weights


def weight_input_indices(node: onnx.NodeProto) -> tuple[int, ...]:
    """Input indices that hold a weight (never the bias)."""
    if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
        return (1,)
    if node.op_type == "MatMul":
        return (0, 1)
    return ()
