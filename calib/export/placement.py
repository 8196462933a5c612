"""Where Q/DQ pairs go: TensorRT's placement rules and ONNX Runtime's.

A placement turns a model and its ranges into a ``Plan``: which activation edges
(tensor -> consumer input) read a quantize-dequantize copy of the tensor, which
weights are stored as int8 behind a DequantizeLinear, which tensors must share
one scale, and which tensors were left out on purpose (with the reason).

Each rule is a named function ``rule(ctx, plan) -> None`` whose docstring shows
the pattern it matches and says why the runtime wants it; ``plan_trt`` and
``plan_ort`` run them in order. The rules never edit the model.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import onnx

from calib.calibrate.base import TensorRange
from calib.errors import ConfigError, RangesError
from calib.model import WEIGHTED_OPS, Model

__all__ = [
    "Edge",
    "WeightSlot",
    "Plan",
    "PlacementContext",
    "HUGE_AMAX",
    "PLACEMENTS",
    "ORT_INT8_OPS",
    "resolve_exclude",
    "plan_trt",
    "plan_ort",
    "make_plan",
    "quantize_weighted_op_inputs",
    "quantize_residual_add_shortcut",
    "keep_graph_output_producers_float",
    "drop_excluded",
    "quantize_pooling_next_to_quantized",
    "skip_huge_tensors",
    "share_concat_scale",
    "quantize_ort_node_io",
]

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
        constant = set(m.initializers)
        for n in m.graph.node:
            if n.input and all((not i) or i in constant for i in n.input):
                constant.update(o for o in n.output if o)
        self.constant = constant
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


def weight_axis(node: onnx.NodeProto, index: int, weight_rank: int) -> int:
    """Per-output-channel axis of a weight input.

    Conv ``[Cout, Cin/g, k...]`` -> 0. ConvTranspose ``[Cin, Cout/g, k...]`` -> 1
    (with group > 1 one scale per axis-1 index is shared by the groups: ONNX
    allows one axis only). Gemm B: 0 if ``transB`` else 1. MatMul constant B
    ``[..., K, N]`` -> the last axis (N).
    """
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return weight_rank - 1
    raise ValueError(f"no per-channel axis for {node.op_type}")


def _weight_inputs(node: onnx.NodeProto) -> tuple[int, ...]:
    """Input indices that hold a weight (never the bias)."""
    if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
        return (1,)
    if node.op_type == "MatMul":
        return (0, 1)
    return ()


# ---------------------------------------------------------------- TensorRT rules


def quantize_weighted_op_inputs(ctx: PlacementContext, plan: Plan, per_channel: bool = True) -> None:
    """Quantize every input of Conv, ConvTranspose, Gemm and MatMul (bias excepted).

    Pattern::

        x -> Q -> DQ -\\
                       Conv -> y          (y is not quantized)
        W(int8) -> DQ -/

    TensorRT runs a convolution or GEMM in INT8 only when both its data input
    and its weight arrive through DequantizeLinear; it then fuses the DQs into
    the kernel. Outputs are left unquantized (TensorRT's recommendation and
    ModelOpt's ``OpTypesToExcludeOutputQuantization``): the next layer's input
    Q provides the requantisation. Constant weights are per-output-channel;
    MatMul with two activations (attention) quantizes both per tensor.
    """
    for node in ctx.model.graph.node:
        if node.op_type not in WEIGHTED_OPS:
            continue
        weight_idx = _weight_inputs(node)
        for idx, t in enumerate(node.input):
            if not t or idx > 1:  # input 2 is the bias (Conv, ConvTranspose) or C (Gemm): stays float
                continue
            if idx in weight_idx and t in ctx.constant and not ctx.is_weight(t) and ctx.model.is_float(t):
                plan.skipped.setdefault(t, f"weight of '{node.name}' is computed by nodes, not an initializer; "
                                           "left float")
            elif idx in weight_idx and ctx.is_weight(t):
                rank = len(ctx.model.initializers[t].dims)
                axis = None
                if per_channel and not (node.op_type == "MatMul" and idx == 0) and rank >= 2:
                    axis = weight_axis(node, idx, rank)
                plan.weights.append(WeightSlot(node.name, idx, t, axis))
            elif ctx.is_activation(t):
                plan.add(Edge(t, node.name, idx), "quantize_weighted_op_inputs")


def _backbone_is_weighted(ctx: PlacementContext, tensor: str, limit: int = 4) -> bool:
    """True if ``tensor`` comes from Conv/ConvTranspose/Gemm/MatMul through at most ``limit`` fusable ops."""
    p = ctx.producer(tensor)
    for _ in range(limit + 1):
        if p is None:
            return False
        if p.op_type in WEIGHTED_OPS:
            return True
        if p.op_type not in FUSED_EPILOGUE_OPS or not p.input:
            return False
        p = ctx.producer(p.input[0])
    return False


def quantize_residual_add_shortcut(ctx: PlacementContext, plan: Plan) -> None:
    """Quantize the shortcut input of a residual Add whose other input comes from a Conv/Gemm.

    Pattern::

        x ----------------------> Q -> DQ -\\
         \\-> Conv -> BN -> Relu -> y -------Add -> z
                                   (y: not quantized)

    TensorRT fuses ``Conv (+BN/act) + Add`` into one INT8 kernel when the
    shortcut arrives through DQ; a Q/DQ on the backbone branch would split the
    fusion. As in ModelOpt's ``build_non_residual_input_map``, the backbone is
    the input on the longer path from the common ancestor; we measure it by
    topological depth (the deeper input is the backbone) and require it to
    come from a weighted op through fusable ops only.
    """
    depth = ctx.model.tensor_depth
    for node in ctx.model.graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        a, b = node.input
        if not (ctx.is_activation(a) and ctx.is_activation(b)):
            continue
        da, db = depth.get(a, 0), depth.get(b, 0)
        backbone, shortcut, s_idx = (a, b, 1) if da >= db else (b, a, 0)
        if _backbone_is_weighted(ctx, backbone):
            plan.add(Edge(shortcut, node.name, s_idx), "quantize_residual_add_shortcut")


def keep_graph_output_producers_float(ctx: PlacementContext, plan: Plan) -> None:
    """Never quantize a graph output; keep nodes that produce one float unless weighted.

    Pattern::

        ... -> Softmax -> probs (graph output)     Softmax's input: no Q/DQ
        ... -> Gemm    -> logits (graph output)    Gemm's inputs: Q/DQ as usual

    A Q/DQ pair on or just before a network output costs accuracy where it is
    measured and buys no fusion (ModelOpt's ``get_skipped_output_layers``).
    """
    producers = {ctx.producer(o).name for o in ctx.graph_outputs if ctx.producer(o) is not None}
    weighted = {n.name for n in ctx.model.graph.node if n.op_type in WEIGHTED_OPS}
    for e in plan.drop(lambda e: e.tensor in ctx.graph_outputs):
        plan.skipped.setdefault(e.tensor, "graph output")
    plan.drop(lambda e: e.node in producers and e.node not in weighted)


def drop_excluded(ctx: PlacementContext, plan: Plan) -> None:
    """Leave excluded nodes and tensors in float (mixed precision).

    Pattern: ``--exclude conv3`` removes every Q/DQ feeding ``conv3`` and its
    int8 weight; ``--exclude some_tensor`` also keeps that tensor unquantized
    for every consumer. This is how calib expresses mixed precision.
    """
    plan.drop(lambda e: e.node in ctx.excluded_nodes or e.tensor in ctx.excluded_tensors)
    plan.weights = [w for w in plan.weights if w.node not in ctx.excluded_nodes]


def _quantized_nodes(plan: Plan) -> set[str]:
    return plan.quantized_nodes


def _neighbours_through_copies(ctx: PlacementContext, node: onnx.NodeProto) -> set[str]:
    """Names of the producer and consumers of ``node``, looking through copy ops."""
    found: set[str] = set()
    stack = [ctx.producer(t) for t in node.input if t]
    seen: set[str] = set()
    while stack:
        p = stack.pop()
        if p is None or p.name in seen:
            continue
        seen.add(p.name)
        found.add(p.name)
        if p.op_type in COPY_OPS and p.input:
            stack.append(ctx.producer(p.input[0]))
    stack2 = [c for o in node.output for c in ctx.consumers(o)]
    while stack2:
        c = stack2.pop()
        if c.name in seen:
            continue
        seen.add(c.name)
        found.add(c.name)
        if c.op_type in COPY_OPS:
            stack2.extend(cc for o in c.output for cc in ctx.consumers(o))
    return found


def quantize_pooling_next_to_quantized(ctx: PlacementContext, plan: Plan) -> None:
    """Quantize the input of a pooling node whose producer or consumer is quantized.

    Pattern::

        Conv -> y -> Q -> DQ -> MaxPool -> Q -> DQ -> Conv
                      (added)               (input rule)

    TensorRT runs pooling in INT8 when a DQ feeds it and a Q follows, and then
    chains it with the neighbouring INT8 convolutions. Next to float layers a
    quantized pool would only add a round trip, so (as ModelOpt's
    ``find_quantizable_nodes``) it is quantized only beside a quantized node,
    looking through copy ops (Reshape, Transpose, ...).
    """
    for _ in range(2):  # a second pass lets pools next to newly quantized pools follow
        quantized = _quantized_nodes(plan)
        for node in ctx.model.graph.node:
            if node.op_type not in POOLING_OPS or node.name in ctx.excluded_nodes:
                continue
            t = node.input[0] if node.input else ""
            if not ctx.is_activation(t) or t in ctx.graph_outputs:
                continue
            if _neighbours_through_copies(ctx, node) & quantized:
                plan.add(Edge(t, node.name, 0), "quantize_pooling_next_to_quantized")


def skip_huge_tensors(ctx: PlacementContext, plan: Plan) -> None:
    """Do not quantize tensors holding mask-like huge values (amax > 1e30, or flagged).

    Flagged: listed in ``export_qdq(flagged=...)`` (the CLI flags tensors whose
    statistics saw non-finite values) or whose range says all values were NaN/inf.

    Pattern::

        mask (float32 min / -inf where padded) -> Add -> Softmax

    An attention mask carries float32 min (or -inf) beside 0; one int8 scale
    turns every real value into 0 and the mask into garbage. Such tensors are
    listed in ``Plan.skipped`` with the reason, never dropped silently.
    """
    for t in plan.tensors:
        r = getattr(ctx.ranges, "tensors", ctx.ranges).get(t)  # Ranges[t] raises RangesError, not KeyError
        if t in ctx.flagged:
            reason = f"flagged: {ctx.flagged[t]}"
        elif r is not None and r.amax > HUGE_AMAX:
            reason = f"amax {r.amax:.3g} > {HUGE_AMAX:g} (mask-like values)"
        elif r is not None and r.degenerate and ("nan" in r.degenerate.lower() or "non-finite" in r.degenerate):
            reason = f"flagged: {r.degenerate}"
        else:
            continue
        plan.skipped[t] = reason
        plan.drop(lambda e, t=t: e.tensor == t)


def share_concat_scale(ctx: PlacementContext, plan: Plan) -> None:
    """Give a Concat's quantized inputs and its quantized output one scale.

    Pattern::

        a -> Q(s) -> DQ -\\
                          Concat -> c -> Q(s) -> DQ -> Conv
        b -> Q(s) -> DQ -/

    TensorRT moves the output Q backward through Concat onto its inputs; with
    equal scales the DQ -> Q pairs cancel and Concat runs in INT8 without
    requantising (ModelOpt's ``get_concat_eliminated_tensors``). calib uses the
    largest member amax for the group, so no member is clipped harder than its
    own calibration asked (ModelOpt recalibrates on pooled data instead).
    """
    quantized = set(plan.tensors)
    for node in ctx.model.graph.node:
        if node.op_type != "Concat" or not node.output:
            continue
        members = [t for t in node.input if t in quantized]
        if node.output[0] in quantized:
            members.append(node.output[0])
        members = list(dict.fromkeys(members))
        if len(members) >= 2:
            plan.shared.append(members)


# ---------------------------------------------------------------- ONNX Runtime rule


def quantize_ort_node_io(ctx: PlacementContext, plan: Plan, per_channel: bool = True) -> None:
    """Quantize the inputs AND outputs of every op ONNX Runtime's CPU provider runs in int8.

    Pattern::

        DQ -> Conv -> Q   ==>   QLinearConv          (likewise MatMul, Gemm,
        DQ -> Add  -> Q   ==>   QLinearAdd            Add, Mul, pools, Concat,
        DQ -> Reshape -> Q ==>  Reshape on int8       Sigmoid, LeakyRelu, ...)

    ONNX Runtime's QDQ selectors fuse a node into its int8 kernel only when
    every data input comes through DequantizeLinear and the output goes
    through QuantizeLinear; that is why this placement, unlike TensorRT's,
    quantizes outputs. Each quantized tensor gets one Q/DQ pair that all its
    consumers read (as ``quantize_static`` does), so int8 kernels chain.
    """
    quantize_weighted_op_inputs(ctx, plan, per_channel=per_channel)
    tensors: set[str] = {e.tensor for e in plan.edges}
    output_only: set[str] = set()
    for node in ctx.model.graph.node:
        if node.op_type not in ORT_INT8_OPS or node.name in ctx.excluded_nodes:
            continue
        ins = [t for i, t in enumerate(node.input) if ctx.is_activation(t)
               and not (node.op_type in ("Reshape", "Slice", "Pad", "Resize", "Split") and i > 0)]
        if not ins:
            continue
        tensors.update(ins)
        outs = [o for o in node.output if ctx.is_activation(o)]
        tensors.update(outs)
        output_only.update(outs)
    output_only -= {t for n in ctx.model.graph.node if n.op_type in ORT_INT8_OPS for t in n.input}
    known = getattr(ctx.ranges, "tensors", ctx.ranges)
    for t in sorted(output_only - set(known)):
        # statistics cover the inputs of quantizable ops; an output read only by other ops
        # (Identity, Shape, HardSwish...) has none: leave it float and say so
        tensors.discard(t)
        plan.skipped[t] = "no range (output read only by ops whose inputs are not collected); left float"
    for t in tensors:
        for c in ctx.consumers(t):
            for i, name in enumerate(c.input):
                if name == t:
                    plan.add(Edge(t, c.name, i), "quantize_ort_node_io")


# ---------------------------------------------------------------- drivers


def plan_trt(ctx: PlacementContext, *, per_channel: bool = True) -> Plan:
    """TensorRT's Q/DQ placement (explicit quantization) with ModelOpt's INT8 policy."""
    plan = Plan("trt")
    quantize_weighted_op_inputs(ctx, plan, per_channel=per_channel)
    quantize_residual_add_shortcut(ctx, plan)
    keep_graph_output_producers_float(ctx, plan)
    drop_excluded(ctx, plan)
    quantize_pooling_next_to_quantized(ctx, plan)
    keep_graph_output_producers_float(ctx, plan)
    skip_huge_tensors(ctx, plan)
    share_concat_scale(ctx, plan)
    return plan


def plan_ort(ctx: PlacementContext, *, per_channel: bool = True) -> Plan:
    """ONNX Runtime's CPU placement: Q/DQ around inputs and outputs of its int8 ops."""
    plan = Plan("ort")
    quantize_ort_node_io(ctx, plan, per_channel=per_channel)
    for e in plan.drop(lambda e: e.tensor in ctx.graph_outputs):
        plan.skipped.setdefault(e.tensor, "graph output")
    drop_excluded(ctx, plan)
    skip_huge_tensors(ctx, plan)
    return plan


PLACEMENTS: dict[str, Callable[..., Plan]] = {"trt": plan_trt, "ort": plan_ort}


def make_plan(ctx: PlacementContext, placement: str, *, per_channel: bool = True) -> Plan:
    try:
        fn = PLACEMENTS[placement]
    except KeyError:
        raise ConfigError(f"unknown placement '{placement}'; expected one of {', '.join(PLACEMENTS)}") from None
    plan = fn(ctx, per_channel=per_channel)
    plan.weights = list(dict.fromkeys(plan.weights))
    return plan
