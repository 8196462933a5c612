"""Rules both placements run: keep excluded nodes/tensors float, and skip tensors one int8 scale
cannot hold (mask-like huge values, or tensors flagged from the statistics: ``flagged_tensors``).
"""

from __future__ import annotations

from calib.export.placement.plan import HUGE_AMAX, PlacementContext, Plan
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
