"""TensorRT's placement rules (explicit quantization, with ModelOpt's INT8 policy), one rule per function.

Each rule ``rule(ctx, plan) -> None`` adds to or drops from the plan; its docstring shows the
pattern and says why TensorRT wants it. ``plan_trt`` (``calib.export.placement``) runs them in order.
"""

from __future__ import annotations

import onnx

from calib.calibrate.weights import weight_axis
from calib.export.placement.plan import (COPY_OPS, FUSED_EPILOGUE_OPS, POOLING_OPS, Edge, PlacementContext, Plan,
                                         WeightSlot, weight_input_indices)
from calib.model import WEIGHTED_OPS


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
        weight_idx = weight_input_indices(node)
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
                    axis = weight_axis(node, rank)
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
