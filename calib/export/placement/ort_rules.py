"""ONNX Runtime's CPU placement rule: Q/DQ around the inputs and outputs of its int8 ops."""

from __future__ import annotations

from calib.export.placement.plan import ORT_INT8_OPS, Edge, PlacementContext, Plan
from calib.export.placement.trt_rules import quantize_weighted_op_inputs
from calib.model import WEIGHTED_OPS


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
    pre = pre_activation_tensors(ctx)
    for node in ctx.model.graph.node:
        if node.op_type not in ORT_INT8_OPS or node.name in ctx.excluded_nodes:
            continue
        ins = [t for i, t in enumerate(node.input) if ctx.is_activation(t) and t not in pre
               and not (node.op_type in ("Reshape", "Slice", "Pad", "Resize", "Split") and i > 0)]
        if not ins and not (node.input and node.input[0] in pre):
            continue
        tensors.update(ins)
        outs = [o for o in node.output if ctx.is_activation(o) and o not in pre]
        tensors.update(outs)
        output_only.update(outs)
    for t, act in pre.items():
        plan.skipped.setdefault(t, f"pre-activation output: quantized after the {act} that follows it")
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


# Activations ONNX Runtime fuses into the int8 conv/matmul before it (QLinearConv + Relu/Clip).
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip"})


def pre_activation_tensors(ctx: PlacementContext) -> dict[str, str]:
    """Outputs of Conv/ConvTranspose/Gemm/MatMul read only by one Relu/Clip: tensor -> "Relu 'name'".

    Pattern::

        DQ -> Conv -> c -> Relu -> r -> Q      (c: no Q/DQ; r: quantized with its own range)

    Quantizing ``c`` with its pre-activation range would spend half the int8 grid on values the
    Relu/Clip then discards; the Q after the activation uses the clipped range (as ONNX
    Runtime's ``quantize_static`` does, which folds the activation into the Q).
    """
    out = {}
    for node in ctx.model.graph.node:
        if node.op_type not in WEIGHTED_OPS or node.name in ctx.excluded_nodes:
            continue
        for t in node.output:
            cons = ctx.consumers(t)
            if (t and t not in ctx.graph_outputs and len(cons) == 1 and cons[0].op_type in FUSED_ACTIVATIONS
                    and cons[0].name not in ctx.excluded_nodes and list(cons[0].input[:1]) == [t]):
                out[t] = f"{cons[0].op_type} '{cons[0].name}'"
    return out
