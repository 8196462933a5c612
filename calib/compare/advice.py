"""``advise``: automatic mixed precision: the fewest float nodes (or better ranges) that meet a target.

It chooses on ``eval_source``, the *selection* samples (``calib.data.split``): not held-out figures.
1. Start: export the Q/DQ model with the first calibration method and measure
   the target metric (step 0 of the curve). With no ``methods`` given, every
   default method is scored in one pass and the best (target metric, then output
   SQNR) becomes the first. ``"auto"`` among ``methods`` (with statistics) starts
   from ``calib.compare.auto.choose_auto``'s per-tensor ranges.
2. Rank the quantized nodes cheaply (``calib.compare.ranking``): local error (each
   node in INT8 on FP32 inputs) on ``sensitivity_samples`` samples, then the
   isolated sensitivity of a shortlist of the locally worst nodes.
3. Greedily, in that order, for the next node X: measure X in float and, for each
   activation tensor X reads, every other method's range for that tensor, beside
   the current model, on the first ``candidate_samples`` samples (default: all).
   Keep the best range change if it scores at least as well as X in float;
   otherwise leave X in float. Re-export and verify on all selection samples (a
   curve point). A node where neither helps is skipped.
4. Stop when the target holds. Otherwise a second pass leaves the remaining nodes
   in float, in ranking order. If the target fails, keep the best model found,
   write it, and raise ``TargetNotMet`` (``advice.gap`` says how close it got).

Time: ``time_budget_s`` (default ``DEFAULT_TIME_BUDGET_S`` = 240 s; ``math.inf``: none) is checked before each
node is tried (at least one is); the start completes, the ranking measures isolated sensitivity while
``RANK_SHARE`` of the budget lasts (the first group while any lasts). Progress: one bar per stage ("advise:
scoring methods", "advise: local error", "advise: isolated sensitivity", "advise step k": node j of N).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from calib.calibrate import Ranges, calibrate, parse_method
from calib.compare.auto import CANDIDATES, candidate_ranges, choose_auto
from calib.compare.evaluate import Evaluator, Session
from calib.compare.mapping import TensorMap, map_models
from calib.compare.metrics import safe_float
from calib.compare.sensitivity import Sensitivity
from calib.compare.ranking import RANK_SHARE, rank_nodes
from calib.compare.targets import Target, UserMetric, parse_target
from calib.compare.variants import Variant, build_multi, float_node_variant, group_variants, prune, rescale_variant
from calib.errors import ConfigError, RangesError, TargetNotMet
from calib.model import Model, as_model, model_from_proto
from calib.export import export_qdq
from calib.io import save_onnx, write_json
from calib.stats import ActivationStats

__all__ = ["Advice", "advise", "DEFAULT_METHODS", "DEFAULT_TIME_BUDGET_S", "advice_json_path"]

log = logging.getLogger(__name__)
Progress = Callable[[str, int, "int | None"], None]

DEFAULT_METHODS = ("entropy", "percentile", "mse", "minmax")
DEFAULT_TIME_BUDGET_S = 240.0  # seconds; the issue asks for < 5 min end to end on 2 cores


@dataclass
class Advice:
    """The result of ``advise``: the Q/DQ model, what stays float, the per-step curve, range choices."""

    qdq: Any  # calib.export.QdqModel
    exclude: list[str]
    curve: list[dict[str, Any]]
    methods: dict[str, str]  # activation tensor -> calibration method used
    target: Target
    metric: float
    met: bool
    base_method: str
    sensitivity: Sensitivity | None = None
    seconds: float = 0.0
    changed: dict[str, str] = field(default_factory=dict)  # tensors whose method differs from base_method
    skipped: list[str] = field(default_factory=list)  # nodes where neither float nor another range helped
    stopped: str = ""  # why the search ended: target met, max_steps, time budget, nodes exhausted
    base_scores: dict[str, float] = field(default_factory=dict)  # method -> target metric, all INT8 (auto base)
    bias: dict[str, Any] | None = None  # bias correction applied afterwards (calib quantize --bias-correction)
    auto: dict[str, Any] | None = None  # choose_auto's record when the start was "auto"

    @property
    def gap(self) -> float:
        """How far the best model is from the target (0 when met; in the metric's units)."""
        return max(0.0, self.target.value - self.metric) if self.metric == self.metric else math.inf

    @property
    def n_float_nodes(self) -> int:
        return len(self.exclude)

    def to_json(self) -> dict[str, Any]:
        return safe_float({
            "format": "calib.advice", "version": 1, "target": str(self.target), "metric": self.metric,
            "met": self.met, "exclude": self.exclude, "n_float_nodes": len(self.exclude),
            "base_method": self.base_method, "base_scores": self.base_scores,
            "changed_methods": self.changed, "methods": self.methods,
            "curve": self.curve, "skipped_nodes": self.skipped, "stopped": self.stopped,
            "sensitivity": self.sensitivity.to_json() if self.sensitivity else None,
            "gap": self.gap, "seconds": round(self.seconds, 3),
            **({"bias_correction": self.bias} if self.bias else {}), **({"auto": self.auto} if self.auto else {})})

    def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """Write the Q/DQ model to ``path`` and the advice (exclude list, curve, methods) beside it."""
        path = Path(path)
        save_onnx(self.qdq.model, path)
        side = advice_json_path(path)
        write_json(side, self.to_json())
        return path, side


def advice_json_path(model_path: str | os.PathLike) -> Path:
    """``model.int8.onnx`` -> ``model.int8.advice.json``."""
    p = Path(model_path)
    return p.with_name((p.stem if p.suffix == ".onnx" else p.name) + ".advice.json")


def _ranges_by_method(stats_or_ranges, methods: Sequence[str] | None) -> dict[str, Any]:
    if isinstance(stats_or_ranges, ActivationStats):
        out = {}
        for m in methods or DEFAULT_METHODS:
            r = calibrate(stats_or_ranges, parse_method(m) if isinstance(m, str) else m)
            out[r.method] = r
        return out
    if isinstance(stats_or_ranges, Ranges):
        if methods:
            raise ConfigError("methods= needs statistics; ranges carry one method",
                              hint="pass ActivationStats (--stats stats.npz) to try several methods")
        return {stats_or_ranges.method: stats_or_ranges}
    if isinstance(stats_or_ranges, Mapping) and stats_or_ranges and all(
            isinstance(v, Ranges) for v in stats_or_ranges.values()):
        return dict(stats_or_ranges)
    raise RangesError(f"advise needs ActivationStats, Ranges or {{method: Ranges}}, got {type(stats_or_ranges).__name__}")


def _mixed(by: dict[str, Any], choice: dict[str, str], base: str):
    tensors = {t: by[m].tensors[t] for t, m in choice.items()}
    label = base if all(m == base for m in choice.values()) else "mixed"
    return Ranges(label, tensors, by[base].model_sha256)


def _fp32_name(tm: TensorMap, qdq_tensor: str) -> str | None:
    return next((f for f, s in tm.sources.items() if s == qdq_tensor), None)


def _num(ms: dict[str, Any], m: str, k: str) -> float:
    v = ms[m].value(k)
    return v if v == v else -math.inf


def _candidates(tm: TensorMap, node: str, choice: dict[str, str], by: dict[str, Any], base_proto
                ) -> list[tuple[Variant, tuple[str, str] | None]]:
    """X in float, and X's activation tensors with each other method's scale (one tensor per variant)."""
    out: list[tuple[Variant, tuple[str, str] | None]] = [(float_node_variant(tm, node, "float"), None)]
    for qi in tm.quantized.get(node, []):
        if qi.is_weight or qi.source is None:
            continue
        t = _fp32_name(tm, qi.value or qi.source)
        if t is None or t not in choice:
            continue
        cur = by[choice[t]].tensors[t].amax
        for m, r in by.items():
            if m == choice[t] or t not in r.tensors or math.isclose(r.tensors[t].amax, cur, rel_tol=1e-6):
                continue
            v = rescale_variant(base_proto, tm, qi.source, r.tensors[t].scale, f"m{len(out)}")
            if v is not None:
                out.append((v, (t, m)))
    return out


@dataclass
class _State:
    """The search so far: current model, its metric, per-tensor methods, float nodes, curve, best."""

    q: Any
    value: float
    choice: dict[str, str]
    exclude: list[str] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)
    best: tuple = ()
    skipped: list[str] = field(default_factory=list)
    stopped: str = ""
    step: int = 0
    tried: int = 0
    metrics: Any = None


class _Search:
    """Settings shared by the steps of one ``advise`` call (no state of the search itself)."""

    def __init__(self, fm: Model, by: dict[str, Any], base: str, ev: Evaluator, ev_pick: Evaluator, tgt: Target, *,
                 placement: str, weights: str, progress: Progress | None, deadline: float, budget_s: float,
                 max_steps: int | None) -> None:
        self.fm, self.by, self.base, self.ev, self.ev_pick, self.tgt = fm, by, base, ev, ev_pick, tgt
        self.placement, self.weights, self.progress = placement, weights, progress
        self.deadline, self.budget_s, self.max_steps = deadline, budget_s, max_steps
        self.outputs = list(fm.output_names)

    def export(self, st: _State):
        return export_qdq(self.fm, _mixed(self.by, st.choice, self.base), placement=self.placement,
                          weights=self.weights, exclude=st.exclude)

    def verify(self, q) -> tuple[float, Any]:
        m, _ = self.ev.evaluate([Session(q.model, {"base": {o: o for o in self.outputs}})])
        return m["base"].value(self.tgt.metric), m["base"]

    def record(self, st: _State, action: str, node: str, tensor: str | None) -> None:
        st.q = self.export(st)
        st.value, st.metrics = self.verify(st.q)
        st.curve.append({"step": st.step, "action": action, "node": node, "tensor": tensor,
                         "n_float_nodes": len(st.exclude), "metric": st.value})
        log.info("advise step %d: %s %s -> %s = %.6g", st.step, action, node, self.tgt.metric, st.value)
        if st.value > st.best[0] or (st.value == st.best[0] and len(st.exclude) < len(st.best[2])):
            st.best = (st.value, st.q, list(st.exclude), dict(st.choice))

    def out_of_budget(self, st: _State) -> bool:
        if self.max_steps is not None and st.step >= self.max_steps:
            st.stopped = st.stopped or f"max_steps ({self.max_steps})"
            return True
        if st.tried and time.perf_counter() >= self.deadline:
            st.stopped = st.stopped or f"time budget ({self.budget_s:g} s)"
            return True
        return False

    def tick(self, st: _State, j: int, n: int) -> None:  # "advise step k": candidate node j of N
        if self.progress:
            self.progress(f"advise step {st.step + 1}", j, n)


def _start(s: _Search, choose_base: bool) -> tuple[_State, dict[str, float]]:
    """Step 0: the best method (all scored in one pass) or the first one given."""
    if choose_base:
        qs = {m: export_qdq(s.fm, r, placement=s.placement, weights=s.weights, exclude=[]) for m, r in s.by.items()}
        ms = s.ev.score({m: qm.model for m, qm in qs.items()}, stage="advise: scoring methods", progress=s.progress)
        s.base = max(s.by, key=lambda m: (_num(ms, m, s.tgt.metric), _num(ms, m, "sqnr")))
        s.by = {s.base: s.by[s.base], **{m: r for m, r in s.by.items() if m != s.base}}
        st = _State(qs[s.base], _num(ms, s.base, s.tgt.metric), {t: s.base for t in s.by[s.base].tensors},
                    metrics=ms[s.base])
        scores = {m: _num(ms, m, s.tgt.metric) for m in s.by}
    else:
        st = _State(None, math.nan, {t: s.base for t in s.by[s.base].tensors})
        st.q = s.export(st)
        st.value, st.metrics = s.verify(st.q)
        scores = {}
    st.curve.append({"step": 0, "action": "start", "node": None, "n_float_nodes": 0, "metric": st.value})
    st.best = (st.value, st.q, [], dict(st.choice))
    return st, scores


def _greedy(s: _Search, st: _State, order: list[str]) -> None:
    """Pass 1: per node, the better of float and another method's range (skip the node if neither helps)."""
    for j, node in enumerate(order):
        if s.tgt.met(st.value) or s.out_of_budget(st):
            break
        s.tick(st, j, len(order))
        tm = map_models(s.fm, model_from_proto(st.q.model))
        if node not in tm.quantized:
            continue
        st.tried += 1
        # on all samples the current model's score is ``value``; on a subset it is measured beside
        action, detail, score, current = _step(tm, node, st.choice, s.by, s.ev_pick, s.outputs, s.tgt,
                                               now=st.value if s.ev_pick is s.ev else None)
        if score <= current:
            st.skipped.append(node)
            continue
        st.step += 1
        if action == "float":
            st.exclude.append(node)
            s.record(st, "float", node, None)
        else:
            st.choice[detail[0]] = detail[1]
            s.record(st, f"method {detail[1]}", node, detail[0])


def _float_pass(s: _Search, st: _State, order: list[str]) -> None:
    """Pass 2: the target still fails: leave the remaining nodes in float, in ranking order."""
    rest = [n for n in order if n not in st.exclude]
    for j, node in enumerate(rest):
        if s.tgt.met(st.value) or st.stopped or s.out_of_budget(st):
            break
        s.tick(st, j, len(rest))
        st.tried += 1
        st.step += 1
        st.exclude.append(node)
        s.record(st, "float", node, None)


def _base_ranges(fm: Model, stats_or_ranges, methods: Sequence[str] | None, eval_source, budget_s: float,
                 **kw) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``{method: Ranges}`` to search over, "auto" (per-tensor choice on ``eval_source``) first when asked."""
    chosen = isinstance(stats_or_ranges, Mapping) and "auto" in stats_or_ranges  # auto already chose (pipeline)
    if not (methods and "auto" in methods) or chosen:
        return _ranges_by_method(stats_or_ranges, methods), None
    if not isinstance(stats_or_ranges, ActivationStats):
        raise ConfigError("method 'auto' needs statistics", hint="pass ActivationStats (--stats stats.npz)")
    ch = choose_auto(fm, stats_or_ranges, eval_source, time_budget=budget_s / 2, **kw)
    others = [m for m in methods if m != "auto"] or list(CANDIDATES)
    rest = candidate_ranges(stats_or_ranges, others)
    by = {"auto": ch.ranges, **rest} if methods[0] == "auto" else {**rest, "auto": ch.ranges}
    return by, ch.to_json()


def advise(model: Model | str, stats_or_ranges, eval_source, *, target: str | Target = "cosine:0.99",
           methods: Sequence[str] | None = None, placement: str = "trt", weights: str = "per_channel",
           batch_size: int = 16, labels: Sequence[int] | None = None, metric: Any = None,
           sensitivity_samples: int = 32, shortlist: int = 24, candidate_samples: int | None = None,
           max_steps: int | None = None, time_budget_s: float | None = None, optimization: str = "disable",
           providers: Sequence[str] | None = None, output: str | os.PathLike | None = None,
           progress: Progress | None = None) -> Advice:
    """Find float nodes and per-tensor methods so the Q/DQ model meets ``target`` (see module docstring).

    ``eval_source``: the selection samples. ``output``: where to write the final (or best) Q/DQ model;
    the advice JSON goes beside it. ``max_steps`` / ``time_budget_s`` (None: ``DEFAULT_TIME_BUDGET_S``):
    start no node after that many steps / seconds; the best model so far is kept, and ``TargetNotMet``
    is raised if it misses the target (``Advice.stopped`` says why, ``Advice.gap`` how close it got).
    """
    t0 = time.perf_counter()
    fm = as_model(model)
    tgt = parse_target(target)
    user = UserMetric.wrap(metric) if metric is not None else None
    if tgt.metric == "metric" and user is None:
        raise ConfigError(f"target '{tgt}' needs a user metric", hint="pass metric= (CLI: --metric module:function)")
    budget_s = DEFAULT_TIME_BUDGET_S if time_budget_s is None else time_budget_s
    run = dict(batch_size=batch_size, optimization=optimization, providers=providers)
    by, auto = _base_ranges(fm, stats_or_ranges, methods, eval_source, budget_s, placement=placement,
                            weights=weights, progress=progress, **run)
    ev = Evaluator(fm, eval_source, labels=labels, user=user, **run)
    n_pick = candidate_samples if candidate_samples is not None else ev.n_samples
    ev_pick = ev if n_pick >= ev.n_samples else Evaluator(fm, eval_source, labels=labels, user=user, limit=n_pick,
                                                          **run)
    s = _Search(fm, by, next(iter(by)), ev, ev_pick, tgt, placement=placement, weights=weights, progress=progress,
                deadline=t0 + budget_s, budget_s=budget_s, max_steps=max_steps)
    st, base_scores = _start(s, methods is None and len(by) > 1)
    sens = None
    if not tgt.met(st.value):
        tm = map_models(fm, model_from_proto(st.q.model))
        sens = rank_nodes(fm, tm, eval_source, samples=sensitivity_samples, shortlist=shortlist, progress=progress,
                          deadline=t0 + RANK_SHARE * budget_s, first_deadline=t0 + budget_s, **run)
        _greedy(s, st, sens.ranking)
        _float_pass(s, st, sens.ranking)
    return _finish(s, st, sens, base_scores, auto, t0, output)


def _finish(s: _Search, st: _State, sens, base_scores, auto, t0: float, output) -> Advice:
    """The best model found as an ``Advice``; written to ``output``; ``TargetNotMet`` if it misses."""
    tgt = s.tgt
    value, q, exclude, choice = st.best
    stopped = st.stopped or ("target met" if tgt.met(value) else "every node tried")
    advice = Advice(qdq=q, exclude=exclude, curve=st.curve, methods=dict(choice), target=tgt, metric=value,
                    met=tgt.met(value), base_method=s.base, sensitivity=sens, seconds=time.perf_counter() - t0,
                    changed={t: m for t, m in choice.items() if m != s.base}, skipped=st.skipped,
                    stopped=stopped, base_scores=base_scores, auto=auto)
    if output is not None:
        advice.save(output)
    if not advice.met:
        err = TargetNotMet(
            f"target {tgt} not met: best {tgt.metric} = {value:.6g} ({advice.gap:.3g} short) with {len(exclude)} "
            f"float nodes after {len(st.curve) - 1} steps" + (f", stopped by {st.stopped}" if st.stopped else "")
            + (f" (best model written to {output})" if output is not None else ""),
            hint=_fp32_hint(tgt, st.metrics))
        err.advice = advice
        raise err
    return advice


def _fp32_hint(tgt: Target, metrics) -> str:
    hint = "lower the target, give more representative calibration data, or check the evaluation data"
    if tgt.metric == "accuracy" and metrics is not None and metrics.tasks:
        acc = next(iter(metrics.tasks.values())).result().get("accuracy_fp32")
        if acc is not None:
            hint = f"the FP32 model itself reaches accuracy {acc:.4g} on this data; " + hint
    return hint


def _step(tm: TensorMap, node: str, choice, by, ev: Evaluator, outputs, tgt: Target, now: float | None = None
          ) -> tuple[str, tuple[str, str] | None, float, float]:
    """Measure X in float against X's tensors under other methods on ``ev``'s samples (and the current
    model beside them unless its score there, ``now``, is known); return the better action, its score and
    the current model's score on the same samples. Variant groups run one after another (bounded memory)."""
    base_proto = copy.deepcopy(tm.qdq.proto)
    cands = _candidates(tm, node, choice, by, base_proto)
    budget = max(4 * len(base_proto.graph.node), 64)
    metrics: dict[str, Any] = {}
    for k, group in enumerate(group_variants(base_proto, [v for v, _ in cands], budget)):
        proto, where = build_multi(base_proto, group, outputs)
        prune(proto, {t for w in where.values() for t in w.values()})
        sessions = [Session(proto, where)]
        if now is None and k == 0:
            sessions.append(Session(base_proto, {"current": {o: o for o in outputs}}))
        m, _ = ev.evaluate(sessions)
        metrics.update(m)
    scores = {v.name: metrics[v.name].value(tgt.metric) for v, _ in cands}
    if now is None:
        now = metrics["current"].value(tgt.metric)
    float_score = scores["float"]
    best_m = max((c for c in cands if c[1] is not None), key=lambda c: scores[c[0].name], default=None)
    if best_m is not None and scores[best_m[0].name] >= float_score:
        return "method", best_m[1], scores[best_m[0].name], now
    return "float", None, float_score, now
