"""The run's time budget: one wall-clock deadline that every step after collection plans against.

With a target (``--target``) a run aims at ``RUN_BUDGET_S`` seconds (270 s: the issue's 5 minutes on two
cores, less a margin for loading and writing) unless ``--time-budget S`` (``target.time_budget_s``) says
otherwise; without a target only an explicit ``--time-budget`` sets one (the default path keeps auto's own
search budget). The deadline counts from the start of the run, collection included. Each step asks what
is left and what the steps after it will need (``reserve``):

- choose (``auto``): its search gets at most its own default and, with a target, ``AUTO_SHARE`` of what is
  left after the reserve, or of ``ADVISE_SHARE`` of what verify leaves if that is more (advise gets the
  rest); the single-method scoring always completes;
- advise: what is left after the reserve, and at least ``ADVISE_SHARE`` of what is left after verify's
  (the transforms after it get what remains); its ranking measures isolated sensitivity only while
  ``calib.compare.ranking.RANK_SHARE`` of that lasts; it tries no node after its deadline (at least one);
- equalize / smoothquant / bias correction: each runs only if its estimated cost fits in what is left
  after verify's reserve, else it is skipped; the held-out effect of a transform (a report figure, not a
  choice) is measured only if it fits too;
- verify and write always run: the held-out figures and the best model found.

Estimates come from ``Pace``: the seconds per (graph node x sample) of this run's evaluation passes so far
(every ``Evaluator`` pass reports to it, ``calib.compare.evaluate.recording``; the first one is the FP32
reference on the selection samples, computed right after the split and kept for every later pass). What
the budget cut is ``Budget.cuts``; ``Budget.to_json`` goes into the run's metrics and the CLI prints it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from calib.compare.auto import DEFAULT_TIME_BUDGET_S
from calib.compare.evaluate import Evaluator
from calib.export.transforms import TRANSFORM_KINDS, find_sites

__all__ = ["Budget", "Pace", "RUN_BUDGET_S", "AUTO_SHARE", "ADVISE_SHARE", "MIN_ADVISE_S", "run_seconds", "auto_seconds",
           "advise_seconds", "warm_reference", "reserve_after", "transform_cost", "heldout_cost", "verify_cost"]

log = logging.getLogger(__name__)

RUN_BUDGET_S = 270.0  # seconds: a run with a target and no --time-budget
AUTO_SHARE = 0.4  # with a target: auto's search gets this share of what is left before advise
ADVISE_SHARE = 0.6  # with a target, advise gets at least this share of what is left after verify's reserve
MIN_ADVISE_S = 15.0  # and at least this much when there is that much (it always tries one node)
WRITE_S = 5.0  # writing the model and reports
QDQ_NODES = 1.7  # a Q/DQ model's node count per FP32 node, before one is exported


@dataclass
class Pace:
    """Seconds per (graph node x sample) of the run's evaluation passes, recent passes weighted most."""

    records: list[tuple[float, float]] = field(default_factory=list)  # (node-samples, seconds)

    def add(self, node_samples: float, seconds: float) -> None:
        if node_samples > 0 and seconds >= 0:
            self.records.append((float(node_samples), float(seconds)))

    def rate(self) -> float:
        """Seconds per node-sample over the last few passes (NaN before any)."""
        recent = self.records[-6:]
        work = sum(n for n, _ in recent)
        return sum(s for _, s in recent) / work if work else math.nan

    def seconds(self, node_samples: float) -> float:
        r = self.rate()
        return node_samples * r if r == r else 0.0


@dataclass
class Budget:
    """The run's deadline (``seconds`` after ``started``; None: no deadline) and what it cut."""

    seconds: float | None
    started: float = field(default_factory=time.perf_counter)
    pace: Pace = field(default_factory=Pace)
    cuts: list[dict[str, str]] = field(default_factory=list)

    def left(self) -> float:
        if self.seconds is None:
            return math.inf
        return self.started + self.seconds - time.perf_counter()

    def used(self) -> float:
        return time.perf_counter() - self.started

    def fits(self, cost: float, reserve: float = 0.0) -> bool:
        return self.left() - reserve >= cost

    def cut(self, stage: str, what: str) -> None:
        self.cuts.append({"stage": stage, "what": what})
        log.debug("time budget: %s: %s", stage, what)

    def skip(self, stage: str, cost: float, reserve: float) -> bool:
        """True (and recorded) when ``stage``'s estimated ``cost`` does not fit before the ``reserve``."""
        if self.fits(cost, reserve):
            return False
        self.cut(stage, f"skipped (needs about {cost:.0f} s; {max(0.0, self.left() - reserve):.0f} s left "
                        f"after the {reserve:.0f} s kept for the steps after it)")
        return True

    def to_json(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "used_s": round(self.used(), 1), "cut": list(self.cuts)}

    def line(self) -> str:
        """One line for the CLI: the budget, the time used and what it cut."""
        if self.seconds is None:
            return ""
        head = f"time budget {self.seconds:.0f} s, used {self.used():.0f} s"
        if not self.cuts:
            return head + ": nothing cut"
        return head + "; cut: " + "; ".join(f"{c['stage']} {c['what']}" for c in self.cuts)


def run_seconds(cfg) -> float | None:
    """The run's budget: ``time_budget_s`` if set, else ``RUN_BUDGET_S`` with a target, else none."""
    if cfg.time_budget_s and cfg.time_budget_s > 0:
        return float(cfg.time_budget_s)
    return RUN_BUDGET_S if cfg.target else None


def _nodes(proto) -> int:
    return len(proto.graph.node)


def _n(source, limit: int | None = None) -> int:
    n = len(source) if source is not None and hasattr(source, "__len__") else 0
    return min(n, limit) if limit else n


def qdq_nodes(ctx) -> int:
    """The shipped model's node count (estimated from the FP32 model's before one is exported)."""
    return _nodes(ctx.qdq.model) if ctx.qdq is not None else int(QDQ_NODES * _nodes(ctx.model.proto))


def verify_cost(ctx) -> float:
    """verify: the FP32 model, the shipped model and (fp16/bf16 remainder) its FP32-remainder twin on the
    evaluation samples; plus writing."""
    q = qdq_nodes(ctx) * (1 if ctx.cfg.high_precision == "fp32" else 2)
    return ctx.budget.pace.seconds(_n(ctx.ev) * (_nodes(ctx.model.proto) + q)) + WRITE_S


def heldout_cost(ctx) -> float:
    """A transform's held-out effect: FP32 and both versions on the evaluation samples."""
    return ctx.budget.pace.seconds(_n(ctx.ev) * (_nodes(ctx.model.proto) + 2 * qdq_nodes(ctx)))


def transform_cost(ctx, kind: str) -> float:
    """One transform candidate without its held-out effect: its passes over the calibration samples and
    the scoring of both versions on the selection samples."""
    c, f, q = ctx.cfg, _nodes(ctx.model.proto), qdq_nodes(ctx)
    if kind == "bias_correction":  # the shifts and their check: FP32 plus the shadow copies, twice
        data = 2 * _n(ctx.source, c.bias_samples or None) * (f + q)
    else:  # per-channel max|x|, then the changed tensors collected again
        data = 2 * _n(ctx.source, c.limit or None) * f
    return ctx.budget.pace.seconds(data + _n(ctx.sel) * (f + 2 * q))


def region_cost(ctx) -> float:
    """One float-region candidate (``calib.pipeline.float_regions``): the current and the candidate model on
    the selection samples (the FP32 reference is cached)."""
    return ctx.budget.pace.seconds(_n(ctx.sel) * 2 * qdq_nodes(ctx))


def reserve_after(ctx, stage: str) -> float:
    """Seconds the steps after ``stage`` are expected to need: the transforms still to come that fit, then
    verify and write (always)."""
    c = ctx.cfg
    extra = 0.0
    if stage in ("choose", "advise") and c.primary == "auto" and ctx.sel is not None:
        for kind in c.auto_transforms:
            if kind in TRANSFORM_KINDS and find_sites((ctx.base or ctx.model).proto, kind):
                extra += transform_cost(ctx, kind)
    if stage in ("choose", "advise", "equalize") and "bias_correction" in c.transforms:
        extra += transform_cost(ctx, "bias_correction")
    return extra + verify_cost(ctx)


def warm_reference(ctx) -> None:
    """Compute the FP32 reference outputs of the selection samples now (every later pass on them reads the
    run's cache, ``calib.compare.evaluate.sharing_references``): the pace of the first pass, for free."""
    c = ctx.cfg
    if ctx.sel is None or ctx.budget.seconds is None or c.backend == "ray":
        return
    ev = Evaluator(ctx.model, ctx.sel, batch_size=c.batch_size, providers=c.providers)
    ev.evaluate([], stage="FP32 reference (selection samples)", progress=ctx.progress)


def auto_seconds(ctx) -> float:
    """auto's search budget: its default, at most (with a target, ``AUTO_SHARE`` of) what the searches have
    (``_searches``)."""
    if ctx.budget.seconds is None:
        return DEFAULT_TIME_BUDGET_S
    return round(min(DEFAULT_TIME_BUDGET_S, _searches(ctx, "choose") * (AUTO_SHARE if ctx.cfg.target else 1.0)), 1)


def advise_seconds(ctx) -> float | None:
    """advise's budget: what the run has left after the steps that follow it, and at least ``ADVISE_SHARE``
    of what is left after verify's reserve (or ``MIN_ADVISE_S``): the target is advise's, the transforms
    after it run if time remains. None without a run budget (advise's own default)."""
    if ctx.budget.seconds is None:
        return None
    return round(_searches(ctx, "advise"), 1)


def _searches(ctx, stage: str) -> float:
    """What the searches (auto, advise) have from ``stage`` on: what is left after the later steps' reserve,
    and at least ``ADVISE_SHARE`` of what is left after verify's (or ``MIN_ADVISE_S``)."""
    left = ctx.budget.left()
    after_verify = left - verify_cost(ctx)
    floor = min(after_verify, max(MIN_ADVISE_S, ADVISE_SHARE * after_verify))
    return max(left - reserve_after(ctx, stage), floor, 0.0)
