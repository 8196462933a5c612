"""Rules both placements run: keep excluded nodes/tensors float, skip tensors one int8 scale
cannot hold (mask-like huge values, or tensors flagged from the statistics: ``flagged_tensors``),
and, last, keep every weighted node whole (activation and weight both int8, or neither).
"""

from __future__ import annotations

from calib.export.placement.plan import HUGE_AMAX, PlacementContext, Plan, weight_input_indices
from calib.model import WEIGHTED_OPS
from calib.stats import ActivationStats


def flagged_tensors(stats: ActivationStats | None) -> dict[str, str]:
    """The NaN/inf policy: tensor -> why it stays float, for every tensor whose statistics saw non-finite values.

    Pass the result as ``export_qdq(flagged=...)``; ``skip_huge_tensors`` then keeps those
    tensors float and lists them in ``Plan.skipped``. No statistics: nothing is flagged.
    """
    if stats is None:
        return {}
    return {t: f"{h.n_nonfinite} of {h.n} values were NaN/inf" for t, h in stats.tensors.items() if h.n_nonfinite}


def drop_excluded(ctx: PlacementContext, plan: Plan) -> None:
    """Leave excluded nodes and tensors in float (mixed precision).

    Pattern: ``--exclude conv3`` removes every Q/DQ feeding ``conv3`` and its
    int8 weight; ``--exclude some_tensor`` also keeps that tensor unquantized
    for every consumer. This is how calib expresses mixed precision.
    """
    plan.drop(lambda e: e.node in ctx.excluded_nodes or e.tensor in ctx.excluded_tensors)
    plan.weights = [w for w in plan.weights if w.node not in ctx.excluded_nodes]


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


def keep_weighted_nodes_whole(ctx: PlacementContext, plan: Plan) -> None:
    """A Conv/ConvTranspose/Gemm/MatMul reads its activation inputs and its weight through DQ, or neither.

    Pattern::

        x (left float by a rule: excluded, flagged, huge, graph output) -> Conv <- DQ <- W_int8
          ==>  x -> Conv <- W (float)              the weight slot goes too
        DQ(x) -> MatMul <- W computed by nodes (float)
          ==>  x -> MatMul <- W                    the activation edge goes too

    Runs after every rule that drops edges. A half-quantized node matches no int8 kernel in
    TensorRT or ONNX Runtime (both need every data input behind DQ), so its int8 half only adds
    rounding error. What was dropped is listed in ``Plan.skipped`` with the reason.
    """
    for node in ctx.model.graph.node:
        if node.op_type not in WEIGHTED_OPS or node.name in ctx.excluded_nodes:
            continue
        slots = [w for w in plan.weights if w.node == node.name]
        acts = [(i, t) for i, t in enumerate(node.input[:2]) if ctx.is_activation(t)]
        quantized = [(i, t) for i, t in acts if any(e.tensor == t and e.node == node.name and e.index == i
                                                    for e in plan.edges)]
        float_acts = [t for i, t in acts if (i, t) not in quantized]
        if slots and float_acts:
            plan.weights = [w for w in plan.weights if w.node != node.name]
            for w in slots:
                plan.skipped.setdefault(w.initializer, f"weight of '{node.name}': its input '{float_acts[0]}' "
                                                       "stays float, so the weight does too (no half-int8 node)")
            _drop_inputs(plan, node.name, quantized, f"'{node.name}' keeps input '{float_acts[0]}' float")
            continue
        weight_idx = set(weight_input_indices(node))
        float_weights = [t for i, t in enumerate(node.input[:2]) if i in weight_idx and t in ctx.constant
                         and ctx.model.is_float(t) and not any(w.index == i for w in slots)]
        if quantized and float_weights and not slots:
            _drop_inputs(plan, node.name, quantized, f"weight '{float_weights[0]}' of '{node.name}' stays float")


def _drop_inputs(plan: Plan, node: str, edges: list[tuple[int, str]], why: str) -> None:
    """Drop ``node``'s activation input edges; a tensor left with no quantized reader is listed as skipped."""
    if not edges:
        return
    plan.drop(lambda e: e.node == node and (e.index, e.tensor) in edges)
    left = set(plan.tensors)
    for _, t in edges:
        if t not in left:
            plan.skipped.setdefault(t, f"{why}, so this input does too (no half-int8 node)")
