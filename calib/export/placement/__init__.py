"""Where Q/DQ pairs go: TensorRT's placement rules and ONNX Runtime's.

A placement turns a model and its ranges into a ``Plan``: which activation edges
(tensor -> consumer input) read a quantize-dequantize copy of the tensor, which
weights are stored as int8 behind a DequantizeLinear, which tensors must share
one scale, and which tensors were left out on purpose (with the reason).

Each rule is a named function ``rule(ctx, plan) -> None`` whose docstring shows
the pattern it matches and says why the runtime wants it; ``plan_trt`` and
``plan_ort`` run them in order. The rules never edit the model.

Layout: ``plan`` (Plan, PlacementContext, the op sets, ``resolve_exclude``), ``trt_rules``,
``ort_rules``, ``common`` (rules both placements run, and ``flagged_tensors``); this module
holds the drivers and re-exports the public names.
"""

from __future__ import annotations

from typing import Callable

from calib.errors import ConfigError
from calib.export.placement.common import (drop_excluded, flagged_tensors, keep_weighted_nodes_whole,
                                           skip_huge_tensors)
from calib.export.placement.ort_rules import quantize_ort_node_io
from calib.export.placement.plan import (COPY_OPS, FUSED_EPILOGUE_OPS, HUGE_AMAX, ORT_INT8_OPS, POOLING_OPS, Edge,
                                         PlacementContext, Plan, WeightSlot, resolve_exclude)
from calib.export.placement.trt_rules import (keep_graph_output_producers_float, quantize_pooling_next_to_quantized,
                                              quantize_residual_add_shortcut, quantize_weighted_op_inputs,
                                              share_concat_scale)

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
    "flagged_tensors",
    "keep_weighted_nodes_whole",
    "COPY_OPS",
    "POOLING_OPS",
    "FUSED_EPILOGUE_OPS",
]


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
    keep_weighted_nodes_whole(ctx, plan)
    plan.weights = list(dict.fromkeys(plan.weights))
    return plan
