"""``choose_auto``: a calibration range per activation tensor, chosen by its measured effect on the outputs.

From one statistics pass every candidate range of every activation tensor is
known (``CANDIDATES``: minmax, percentile 99.9 / 99.99 / 99.999, entropy, mse).
On the *selection* samples (never the ones figures are reported on, see
``calib.data.split``):

1. Every single method is exported and scored in one pass beside FP32 (FP32
   outputs are computed once and cached by ``Evaluator``). The best one
   (``metric``, then output SQNR) is the start.
2. A round measures, for every quantized activation tensor and every candidate
   with a different range, the current model with only that tensor's scale
   changed. Many such variants share one ONNX Runtime session
   (``calib.compare.variants``).
3. Tensors are taken most sensitive first (largest spread of the metric over
   their candidates). A tensor whose best candidate beats the current model is
   changed, the mixed model re-exported and verified on the selection samples;
   the change is kept only if the verified model beats the current one.
4. Rounds repeat until no change helps, ``max_rounds`` or ``time_budget`` (s); a
   round the budget cut short says so in ``stopped`` (not "no change helps").
   A change is kept only if it beats the current model, so the result never
   scores below the best single method on the selection samples.

"Beats" (steps 3 and 4) is a paired per-sample comparison for the default metric
``sqnr`` (``PAIRED_METRICS``, ``calib.compare.paired``): the per-sample output
error of the two models on the same selection samples; the mean gain must be
positive (beyond a 1e-6 relative tolerance) and exceed ``TENSOR_MIN_T`` standard
errors of the per-sample differences. For one output this is "the pooled output
SQNR improves"; for several, the sum of the outputs' noise-to-signal ratios
falls. Each history entry records the test (``paired``: mean gain, standard
error, t, n, wins), so a change that one or two samples carried can be seen.
``TENSOR_MIN_T`` is 0: thresholds of 0.5, 1 and 2 standard errors (meant to stop
over-fitting the 32 selection samples of 128) were measured on the peers suite's
fmnist_cnn, resnet_fmnist and magika and never did better on held-out data
(held-out output cosine lower or equal on all three, top-1 agreement within one
sample): the small changes they refused helped on average. Other metrics
(``top1``, ``cosine``, ...: no per-sample loss) keep the tolerance rule.

Per tensor the result records the chosen candidate, the runner-up (the best
candidate with a different range) and the margin between them in the metric's
units, as measured in the last round.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import onnx

from calib.calibrate import INT8_MAX, Ranges, TensorRange, calibrate, parse_method
from calib.compare.evaluate import Evaluator, Session
from calib.compare.mapping import TensorMap, map_models
from calib.compare.metrics import safe_float
from calib.compare.paired import Gain, paired_gain
from calib.compare.report import as_model
from calib.compare.variants import Variant, build_multi, group_variants, prune, rescale_variant
from calib.export import export_qdq
from calib.model import Model, model_from_proto
from calib.stats import ActivationStats

__all__ = ["CANDIDATES", "DEFAULT_TIME_BUDGET_S", "AutoChoice", "choose_auto", "candidate_ranges"]

log = logging.getLogger(__name__)
Progress = Callable[[str, int, "int | None"], None]

CANDIDATES = ("minmax", "percentile:99.9", "percentile:99.99", "percentile:99.999", "entropy", "mse")
DEFAULT_TIME_BUDGET_S = 120.0  # seconds; None: no limit
TOLERANCE = 1e-6  # a change must improve the metric by more than this (relative to |metric|, at least absolute)
TENSOR_MIN_T = 0.0  # standard errors a tensor change must gain by (calib.compare.paired; measured: 0 is best)
PAIRED_METRICS = ("sqnr",)  # metrics whose changes are accepted by the paired per-sample test (calib.compare.paired)


@dataclass
class AutoChoice:
    """The chosen ranges (``method == "auto"``; each ``TensorRange.method`` names its candidate) and why."""

    ranges: Ranges
    records: dict[str, dict[str, Any]]  # tensor -> chosen, runner_up, margin, scores
    scores: dict[str, float]  # single method -> metric on the selection samples
    base_method: str
    metric: str
    value: float  # the chosen ranges' metric on the selection samples
    n_select: int
    seconds: float = 0.0
    stopped: str = ""
    rounds: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def changed(self) -> dict[str, str]:
        """Tensors whose candidate differs from the best single method."""
        return {t: r["chosen"] for t, r in self.records.items() if r["chosen"] != self.base_method}

    def annotate_scales(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Add each tensor's chosen candidate, runner-up and margin to a ``scale_report`` document (in place)."""
        for row in doc.get("activations", []):
            rec = self.records.get(row["tensor"])
            if rec is not None:
                row["auto"] = safe_float({k: rec[k] for k in ("chosen", "runner_up", "margin")})
        doc["auto"] = safe_float({"metric": self.metric, "value_on_selection": self.value, "n_select": self.n_select,
                                  "base_method": self.base_method, "stopped": self.stopped})
        return doc

    def to_json(self) -> dict[str, Any]:
        return safe_float({
            "format": "calib.auto", "version": 1, "metric": self.metric, "value": self.value,
            "measured_on": f"selection samples ({self.n_select}); not a reported figure",
            "base_method": self.base_method, "single_method_scores": self.scores, "changed": self.changed,
            "tensors": self.records, "rounds": self.rounds, "history": self.history, "stopped": self.stopped,
            "seconds": round(self.seconds, 3)})


def candidate_ranges(stats: ActivationStats, candidates: Sequence[str] = CANDIDATES) -> dict[str, Ranges]:
    """``{label: Ranges}`` of every candidate, from the one statistics pass."""
    out = {}
    for c in candidates:
        r = calibrate(stats, parse_method(c))
        out[r.method] = r
    return out


def _mixed(by: dict[str, Ranges], choice: dict[str, str]) -> Ranges:
    any_r = next(iter(by.values()))
    tensors = {t: TensorRange(by[m].tensors[t].amax, m, by[m].tensors[t].degenerate) for t, m in choice.items()}
    return Ranges("auto", tensors, any_r.model_sha256)


def _better(a: float, b: float) -> bool:
    """``a`` beats ``b`` by more than the tolerance (NaN never beats)."""
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a - b > TOLERANCE * max(1.0, abs(b))


def _num(v: float) -> float:
    return -math.inf if v != v else v


def _accept(metric: str, cand, cur) -> tuple[bool, Gain | None]:
    """Whether ``cand`` (OutputMetrics) beats ``cur``: the paired per-sample test for ``PAIRED_METRICS`` (when
    the samples have ids), else the metric by more than the tolerance. Also the paired gain, if measured."""
    if metric in PAIRED_METRICS and cand.samples.err2 and cur.samples.err2:
        g = paired_gain(cur.samples, cand.samples)
        return g.significant(TENSOR_MIN_T), g
    return _better(cand.value(metric), cur.value(metric)), None


class _Search:
    """The state of one search: candidates, evaluator, current choice and model."""

    def __init__(self, fm: Model, by: dict[str, Ranges], ev: Evaluator, *, metric: str, placement: str,
                 weights: str, exclude: Sequence[str], progress: Progress | None, deadline: float) -> None:
        self.fm, self.by, self.ev, self.metric = fm, by, ev, metric
        self.placement, self.weights, self.exclude = placement, weights, list(exclude)
        self.progress, self.deadline = progress, deadline
        self.outputs = list(fm.output_names)
        self.cut = False  # the time budget cut a round short (measurement or verification)
        self.cur: Any = None  # OutputMetrics of the current model on the selection samples

    def export(self, choice: dict[str, str]):
        return export_qdq(self.fm, _mixed(self.by, choice), placement=self.placement, weights=self.weights,
                          exclude=self.exclude)

    def out_of_time(self) -> bool:
        return time.perf_counter() >= self.deadline

    def score_methods(self) -> tuple[str, dict[str, float]]:
        """Score every single method in one pass; return the best and all scores."""
        models = {m: self.export({t: m for t in r.tensors}).model for m, r in self.by.items()}
        ms = self.ev.score(models, stage="auto: scoring single methods", progress=self.progress)
        scores = {m: ms[m].value(self.metric) for m in models}
        base = max(models, key=lambda m: (_num(scores[m]), _num(ms[m].value("sqnr"))))
        self.cur = ms[base]
        return base, scores

    def verify(self, choice: dict[str, str], label: str) -> tuple[Any, Any]:
        """The model of ``choice`` and its OutputMetrics on the selection samples."""
        q = self.export(choice)
        m, _ = self.ev.evaluate([Session(q.model, {"base": {o: o for o in self.outputs}})], stage=label)
        return q, m["base"]

    def variants(self, proto: onnx.ModelProto, tm: TensorMap, choice: dict[str, str]
                 ) -> tuple[list[Variant], dict[str, dict[str, str]]]:
        """One variant per (tensor, distinct candidate range); ``{tensor: {candidate: variant or 'base'}}``."""
        out: list[Variant] = []
        where: dict[str, dict[str, str]] = {}
        for t, cur in choice.items():
            src = tm.sources.get(t)
            if src is None:
                continue
            seen: dict[float, str] = {self.by[cur].tensors[t].amax: "base"}
            labels: dict[str, str] = {}
            for m, r in self.by.items():
                amax = r.tensors[t].amax
                key = next((a for a in seen if math.isclose(a, amax, rel_tol=1e-6)), None)
                if key is None:
                    v = rescale_variant(proto, tm, src, amax / INT8_MAX, f"v{len(out)}")
                    if v is None:
                        break  # no Q/DQ on this tensor (placement left it float)
                    out.append(v)
                    seen[amax] = v.name
                    key = amax
                labels[m] = seen[key]
            else:
                if len(set(labels.values())) > 1:
                    where[t] = labels
        return out, where

    def measure_round(self, q, choice: dict[str, str], r: int
                      ) -> tuple[float, dict[str, dict[str, float]], dict[str, set[str]]]:
        """The current model and every single-tensor change, on the selection samples: the current metric,
        ``{tensor: {candidate: metric}}`` and ``{tensor: candidates that beat the current model}``
        (``_accept``: the paired per-sample test for ``PAIRED_METRICS``)."""
        proto = q.model
        tm = map_models(self.fm, model_from_proto(proto))
        variants, where = self.variants(proto, tm, choice)
        groups = group_variants(proto, variants, max(4 * len(proto.graph.node), 64)) if variants else [[]]
        metrics: dict[str, Any] = {}
        for k, group in enumerate(groups):  # one session at a time: memory bounded by one group
            if k and self.out_of_time():
                self.cut = True
                break
            if self.progress:
                self.progress(f"auto round {r}: measuring tensor variants", k, len(groups))
            mp, w = build_multi(proto, group, self.outputs)
            prune(mp, {t for x in w.values() for t in x.values()})
            metrics.update(self.ev.evaluate([Session(mp, w)])[0])
        now = metrics["base"].value(self.metric)
        scores = {t: {m: (now if v == "base" else metrics[v].value(self.metric)) for m, v in labels.items()}
                  for t, labels in where.items() if all(v == "base" or v in metrics for v in labels.values())}
        helps = {t: {m for m, v in where[t].items() if v != "base" and _accept(self.metric, metrics[v], metrics["base"])[0]}
                 for t in scores}
        return now, scores, helps


def _order(scores: dict[str, dict[str, float]]) -> list[str]:
    """Tensors most sensitive first: the largest spread of the metric over their candidates."""
    def spread(t: str) -> float:
        v = [x for x in scores[t].values() if x == x and math.isfinite(x)]
        return max(v) - min(v) if v else 0.0
    return sorted(scores, key=lambda t: (-spread(t), t))


def _record(chosen: str, scores: dict[str, float], amax: dict[str, float]) -> dict[str, Any]:
    """Chosen candidate, runner-up (best with a different range) and margin, from one round's scores."""
    others = [m for m in scores if not math.isclose(amax[m], amax[chosen], rel_tol=1e-6)]
    runner = max(others, key=lambda m: _num(scores[m])) if others else None
    margin = scores[chosen] - scores[runner] if runner is not None else None
    same = sorted(m for m in scores if m != chosen and m not in others)
    return {"chosen": chosen, "amax": amax[chosen], "runner_up": runner, "margin": margin,
            "same_range": same, "scores": dict(scores)}


def _round(s: _Search, q, value: float, choice: dict[str, str], r: int, history: list
           ) -> tuple[Any, float, dict[str, dict[str, float]], bool]:
    """One round of tensor-by-tensor improvement (see the module docstring); returns whether anything changed."""
    now, scores, helps = s.measure_round(q, choice, r)
    order = [t for t in _order(scores) if helps[t]]
    changed = False
    for k, t in enumerate(order):
        if s.out_of_time():
            s.cut = True
            break
        if s.progress:
            s.progress(f"auto round {r}: verifying tensors", k, len(order))
        best = max(helps[t], key=lambda m: (_num(scores[t][m]), m))
        trial = {**choice, t: best}
        q2, m2 = s.verify(trial, f"auto round {r}: tensor {k + 1} of {len(order)}")
        v2 = m2.value(s.metric)
        kept, gain = _accept(s.metric, m2, s.cur)
        history.append({"round": r, "tensor": t, "candidate": best, "metric": v2, "kept": kept,
                        **({"paired": gain.to_json()} if gain is not None else {})})
        if kept:
            q, value, choice[t], changed, s.cur = q2, v2, best, True, m2
            scores[t] = {m: (v2 if m == best else x) for m, x in scores[t].items()}
    if s.progress and order:
        s.progress(f"auto round {r}: verifying tensors", len(order), len(order))
    return q, value, scores, changed


def choose_auto(model: Model | str, stats: ActivationStats, selection_source, *,
                candidates: Sequence[str] = CANDIDATES, placement: str = "trt", weights: str = "per_channel",
                exclude: Sequence[str] = (), batch_size: int = 16, metric: str = "sqnr", max_rounds: int = 2,
                time_budget: float | None = DEFAULT_TIME_BUDGET_S, optimization: str = "disable",
                providers: Sequence[str] | None = None, progress: Progress | None = None) -> AutoChoice:
    """Choose a candidate range per activation tensor on ``selection_source`` (see the module docstring).

    ``metric``: a target metric name (``calib.compare.targets.TARGET_METRICS``), higher is better;
    ``sqnr`` (lowest output SQNR, dB) is continuous and suits selection. ``time_budget`` (seconds,
    default ``DEFAULT_TIME_BUDGET_S`` = 120; None: no limit): no further variant group or verification
    starts after it (the single-method scoring and one variant group always complete).
    """
    t0 = time.perf_counter()
    fm = as_model(model)
    by = candidate_ranges(stats, candidates)
    ev = Evaluator(fm, selection_source, batch_size=batch_size, optimization=optimization, providers=providers)
    deadline = t0 + time_budget if time_budget is not None else math.inf
    s = _Search(fm, by, ev, metric=metric, placement=placement, weights=weights, exclude=exclude,
                progress=progress, deadline=deadline)
    base, single = s.score_methods()
    choice = {t: base for t in by[base].tensors}
    q, value = s.export(choice), single[base]
    history: list[dict[str, Any]] = []
    scores: dict[str, dict[str, float]] = {}
    stopped, r = f"max_rounds ({max_rounds})", 0
    while r < max_rounds:
        if s.out_of_time():
            stopped = f"time budget ({time_budget:g} s)"
            break
        r += 1
        q, value, scores, changed = _round(s, q, value, choice, r, history)
        if not changed:
            stopped = f"time budget ({time_budget:g} s)" if s.cut else "no change helps"
            break
    amax = {t: {m: by[m].tensors[t].amax for m in by} for t in scores}
    records = {t: _record(choice[t], scores[t], amax[t]) for t in scores}
    return AutoChoice(_mixed(by, choice), records, single, base, metric, value, ev.n_samples,
                      time.perf_counter() - t0, stopped, r, history)
