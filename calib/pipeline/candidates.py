"""``auto``'s FP32 transform candidates: cross-layer equalization and SmoothQuant (``calib.export.transforms``).

Each candidate, in ``RunConfig.auto_transforms`` order, is tried once on the whole model (not per tensor):

1. its sites are found in the FP32 model the shipped one is exported from, the per-channel max|x| of the
   tensors it divides is measured on the calibration samples, and the weights are edited (no node added);
2. the tensors whose values changed are collected again on the calibration samples and re-calibrated
   with the method each had (the other tensors keep their ranges);
3. the edited model is exported like the shipped one and both are scored on the *selection* samples;
   the transform is kept only if it improves the output error there by more than the noise of the
   per-sample differences (``calib.pipeline.scoring.keep_change``; else undone: nothing of it remains);
4. the effect on the held-out (or report) samples is measured too, for the report, never for the choice.

Under the run's time budget (``calib.pipeline.budget``) a candidate whose estimated cost does not fit before
verify's reserve is not tried, and a held-out effect that does not fit is not measured (both recorded).

What happened is one entry of ``Context.transforms`` (``calib.pipeline.scoring.transform_record``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from calib.calibrate import Ranges, calibrate
from calib.collect import collect
from calib.export.transforms import TRANSFORM_KINDS, apply_sites, find_sites
from calib.model import Model, model_from_proto
from calib.pipeline.budget import heldout_cost, transform_cost, verify_cost
from calib.pipeline.float_regions import float_regions_step
from calib.pipeline.scoring import keep_change, score_pair, transform_record
from calib.pipeline.steps import Context, export_shipped, final_ranges
from calib.runtime import open_runner, run_batches

__all__ = ["equalize_step", "try_transform", "channel_absmax"]

log = logging.getLogger(__name__)


def channel_absmax(model: Model, source, axes: dict[str, int], *, batch_size: int, limit: int | None,
                   providers) -> dict[str, np.ndarray]:
    """max|x| per channel (``axes``: tensor -> channel axis) of each tensor over ``source``."""
    out: dict[str, np.ndarray] = {}
    with open_runner(model.proto, list(axes), providers=providers, name="transform statistics") as runner:
        for _, _, outs in run_batches(source, model, batch_size, [runner], limit=limit):
            for t, ax in axes.items():
                a = np.abs(np.asarray(outs[0][t], np.float64))
                a = np.moveaxis(a, ax, -1).reshape(-1, a.shape[ax]).max(axis=0)
                out[t] = a if t not in out else np.maximum(out[t], a)
    return out


def equalize_step(ctx: Context) -> None:
    """``auto`` only: try each FP32 transform of ``auto_transforms`` (bias correction runs later, with the
    other model transforms)."""
    c = ctx.cfg
    if c.primary != "auto" or ctx.sel is None:
        return
    for kind in [k for k in c.auto_transforms if k in TRANSFORM_KINDS]:
        if find_sites((ctx.base or ctx.model).proto, kind) and \
                ctx.budget.skip(kind, transform_cost(ctx, kind), verify_cost(ctx)):
            _unchanged(ctx, kind, "not tried: the run's time budget")
            continue
        try_transform(ctx, kind)
    float_regions_step(ctx)  # the ORT target's elementwise regions (calib.pipeline.float_regions)


def _retune(ctx: Context, new: Model, tensors: list[str]) -> dict[str, Any]:
    """The changed tensors' ranges on the edited model, each by the method it had."""
    c = ctx.cfg
    ranges = final_ranges(ctx)
    wanted = [t for t in tensors if t in ranges.tensors and t not in ctx.flagged]
    if not wanted:
        return {}
    stats = collect(new, ctx.source, tensors=wanted, batch_size=c.batch_size, limit=c.limit or None,
                    providers=c.providers)
    out = {}
    for t in wanted:
        if t in stats.tensors:
            out[t] = calibrate(stats, ranges.tensors[t].method, [t]).tensors[t]
    return out


def _unchanged(ctx: Context, kind: str, why: str) -> None:
    ctx.transforms.append(transform_record(kind, [], False, None, None, target=ctx.cfg.target, why=why))


def try_transform(ctx: Context, kind: str) -> None:
    """Apply ``kind`` to the shipped model's FP32 base, keep it only if the selection samples say it helps."""
    c = ctx.cfg
    base = ctx.base or ctx.model
    sites = find_sites(base.proto, kind)
    if not sites:
        return _unchanged(ctx, kind, "no place in this model where it applies")
    absmax = channel_absmax(base, ctx.source, {s.tensor: s.axis for s in sites}, batch_size=c.batch_size,
                            limit=c.limit or None, providers=c.providers)
    proto, scales = apply_sites(base.proto, sites, absmax)
    done = [s for s in sites if s.tensor in scales]
    if not done:
        return _unchanged(ctx, kind, "every channel scale is 1")
    new = model_from_proto(proto)
    retuned = _retune(ctx, new, sorted({t for s in done for t in s.changed}))
    ranges = final_ranges(ctx)
    cand = export_shipped(ctx, Ranges(ranges.method, {**ranges.tensors, **retuned}, ""), new)
    kw: dict[str, Any] = dict(batch_size=c.batch_size, metric=c.compare_metric, providers=c.providers,
                              progress=ctx.progress)
    sel, outs = score_pair(ctx.model, ctx.qdq.model, cand.model, ctx.sel, stage=f"{kind}: scoring", outputs=True, **kw)
    keep, gain = keep_change(outs, c.target)
    held = score_pair(ctx.model, ctx.qdq.model, cand.model, ctx.ev, stage=f"{kind}: held-out effect", **kw) \
        if ctx.ev is not None and not ctx.budget.skip(f"{kind}: held-out effect", heldout_cost(ctx),
                                                      verify_cost(ctx)) else None
    nodes = list(dict.fromkeys(n for s in done for n in [s.producer, *s.consumers]))
    why = "scored better on the selection samples" if keep else "did not score better on the selection samples: undone"
    ctx.transforms.append(transform_record(kind, nodes, keep, sel, held, target=c.target, why=why,
                                           in_sample=ctx.in_sample, paired=gain))
    log.info("%s: %d site(s), %s", kind, len(done), "kept" if keep else "undone")
    if keep:
        ctx.base, ctx.qdq = new, cand
        ctx.retuned.update(retuned)
        if ctx.advice is not None:
            ctx.advice.qdq = cand
