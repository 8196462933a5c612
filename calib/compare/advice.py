"""``advise``: automatic mixed precision: the fewest float nodes (or better ranges) that meet a target.

1. Export the Q/DQ model with the first calibration method and measure the
   target metric on the evaluation data (step 0 of the curve). With no
   ``methods`` given, every default method is scored in one pass and the best
   (target metric, then output SQNR) becomes the first.
2. Rank the quantized nodes by how much leaving each alone in float helps
   (``calib.compare.sensitivity``).
3. Greedily, in that order, for the next node X: measure, in one multi-variant
   session, X in float and, for each activation tensor X reads, every other
   calibration method's range for that tensor, beside the current model, on the
   first ``candidate_samples`` evaluation samples (default: all of them; a small
   subset cannot tell apart changes of a fraction of a percent). Keep the best range change if it
   scores at least as well as X in float; otherwise leave X in float. Re-export
   and verify the exported model on the evaluation data (a curve point).
   A node where neither helps is skipped.
4. Stop when the target holds. Otherwise a second pass leaves the remaining
   nodes in float, in ranking order. If the target fails even with every node
   in float, keep the best model found, write it, and raise ``TargetNotMet``.
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

from calib.compare.evaluate import Evaluator, Session
from calib.compare.mapping import TensorMap, map_models
from calib.compare.metrics import safe_float
from calib.compare.sensitivity import Sensitivity, sensitivity
from calib.compare.targets import Target, UserMetric, parse_target
from calib.compare.variants import Variant, build_multi, float_node_variant, prune, rescale_variant
from calib.errors import ConfigError, RangesError, TargetNotMet
from calib.model import Model, as_model, model_from_proto

__all__ = ["Advice", "advise", "DEFAULT_METHODS", "advice_json_path"]

log = logging.getLogger(__name__)
Progress = Callable[[str, int, "int | None"], None]

DEFAULT_METHODS = ("entropy", "percentile", "mse", "minmax")


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
            "seconds": round(self.seconds, 3), **({"bias_correction": self.bias} if self.bias else {})})

    def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """Write the Q/DQ model to ``path`` and the advice (exclude list, curve, methods) beside it."""
        from calib.io import save_onnx, write_json

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
    from calib.calibrate import Ranges, calibrate, parse_method
    from calib.stats import ActivationStats

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
    from calib.calibrate import Ranges

    tensors = {t: by[m].tensors[t] for t, m in choice.items()}
    label = base if all(m == base for m in choice.values()) else "mixed"
    return Ranges(label, tensors, by[base].model_sha256)


def _fp32_name(tm: TensorMap, qdq_tensor: str) -> str | None:
    for f, s in tm.sources.items():
        if s == qdq_tensor:
            return f
    return None


def _candidates(tm: TensorMap, node: str, choice: dict[str, str], by: dict[str, Any], base_proto
                ) -> list[tuple[Variant, tuple[str, str] | None]]:
    """X in float, and X's activation tensors with each other method's scale (one tensor per variant)."""
    out: list[tuple[Variant, tuple[str, str] | None]] = [(float_node_variant(tm, node, "float"), None)]
    for qi in tm.quantized.get(node, []):
        if qi.is_weight or qi.source is None:
            continue
        t = _fp32_name(tm, qi.source)
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


def advise(model: Model | str, stats_or_ranges, eval_source, *, target: str | Target = "cosine:0.99",
           methods: Sequence[str] | None = None, placement: str = "trt", weights: str = "per_channel",
           batch_size: int = 16, labels: Sequence[int] | None = None, metric: Any = None,
           sensitivity_samples: int = 128, candidate_samples: int | None = None, max_steps: int | None = None,
           time_budget_s: float | None = None, optimization: str = "disable",
           providers: Sequence[str] | None = None, output: str | os.PathLike | None = None,
           progress: Progress | None = None) -> Advice:
    """Find float nodes and per-tensor methods so the Q/DQ model meets ``target`` (see module docstring).

    ``output``: where to write the final (or, when the target is not met, the
    best) Q/DQ model; the advice JSON goes beside it (``advice_json_path``).
    ``max_steps`` / ``time_budget_s``: start no greedy step after that many steps / seconds (the
    ranking itself always completes, and a time budget always lets one node be tried); the best model
    so far is kept, and ``TargetNotMet`` is raised if it misses the target (``Advice.stopped`` says why).
    """
    from calib.export import export_qdq

    t0 = time.perf_counter()
    fm = as_model(model)
    tgt = parse_target(target)
    user = UserMetric.wrap(metric) if metric is not None else None
    if tgt.metric == "metric" and user is None:
        raise ConfigError(f"target '{tgt}' needs a user metric", hint="pass metric= (CLI: --metric module:function)")
    by = _ranges_by_method(stats_or_ranges, methods)
    base = next(iter(by))
    choice = {t: base for t in by[base].tensors}
    exclude: list[str] = []
    ev = Evaluator(fm, eval_source, batch_size=batch_size, labels=labels, user=user, optimization=optimization,
                   providers=providers)
    # candidates are compared on the first ``candidate_samples`` samples (default: all); every chosen
    # step is then verified on the whole evaluation set (the curve's points)
    n_pick = candidate_samples if candidate_samples is not None else ev.n_samples
    ev_pick = ev if n_pick >= ev.n_samples else Evaluator(
        fm, eval_source, batch_size=batch_size, labels=labels, user=user, optimization=optimization,
        providers=providers, limit=n_pick)
    outputs = list(fm.output_names)
    pre = None
    if methods is None and len(by) > 1:  # no order given: start from the method that scores best here
        qs = {m: export_qdq(fm, r, placement=placement, weights=weights, exclude=[]) for m, r in by.items()}
        ms = ev.score({m: qm.model for m, qm in qs.items()}, stage="advise: scoring methods", progress=progress)

        def num(m: str, k: str) -> float:
            v = ms[m].value(k)
            return v if v == v else -math.inf

        base = max(by, key=lambda m: (num(m, tgt.metric), num(m, "sqnr")))
        by = {base: by[base], **{m: r for m, r in by.items() if m != base}}
        choice = {t: base for t in by[base].tensors}
        pre = (qs[base], num(base, tgt.metric), ms[base], {m: num(m, tgt.metric) for m in by})

    def export():
        return export_qdq(fm, _mixed(by, choice, base), placement=placement, weights=weights, exclude=exclude)

    last: dict[str, Any] = {}

    def verify(q, step: int) -> float:
        m, _ = ev.evaluate([Session(q.model, {"base": {o: o for o in outputs}})], stage=f"advise step {step}",
                           progress=progress)
        last["metrics"] = m["base"]
        return m["base"].value(tgt.metric)

    if pre is not None:  # step 0 was measured with the methods, on the same data
        q, value, last["metrics"], base_scores = pre
    else:
        q, base_scores = export(), {}
        value = verify(q, 0)
    curve = [{"step": 0, "action": "start", "node": None, "n_float_nodes": 0, "metric": value}]
    best = (value, q, list(exclude), dict(choice))
    sens = None
    skipped: list[str] = []
    stopped: list[str] = []
    tried = 0  # nodes tried; a time budget lets at least one through, so a search spent ranking still acts
    if not tgt.met(value):
        tm = map_models(fm, model_from_proto(q.model))
        sens = sensitivity(fm, q, eval_source, batch_size=batch_size, max_samples=sensitivity_samples,
                           optimization=optimization, providers=providers, tensor_map=tm, progress=progress)
        order = sens.float_order()
        step = 0

        def record(action: str, node: str, tensor: str | None) -> None:
            nonlocal q, value, best
            q = export()
            value = verify(q, step)
            curve.append({"step": step, "action": action, "node": node, "tensor": tensor,
                          "n_float_nodes": len(exclude), "metric": value})
            log.info("advise step %d: %s %s -> %s = %.6g", step, action, node, tgt.metric, value)
            if value > best[0] or (value == best[0] and len(exclude) < len(best[2])):
                best = (value, q, list(exclude), dict(choice))

        # pass 1: per node, the better of float and another method's range (skip if neither helps)
        def out_of_budget() -> bool:
            if max_steps is not None and step >= max_steps:
                stopped.append(f"max_steps ({max_steps})")
                return True
            if time_budget_s is not None and tried and time.perf_counter() - t0 >= time_budget_s:
                stopped.append(f"time budget ({time_budget_s:g} s)")
                return True
            return False

        for node in order:
            if tgt.met(value) or out_of_budget():
                break
            tm = map_models(fm, model_from_proto(q.model))
            if node not in tm.quantized:
                continue
            tried += 1
            # on all samples the current model's score is ``value``; on a subset it is measured beside
            action, detail, score, current = _step(tm, node, choice, by, ev_pick, outputs, tgt, progress, step + 1,
                                                   now=value if ev_pick is ev else None)
            if score <= current:
                skipped.append(node)
                continue
            step += 1
            if action == "float":
                exclude.append(node)
                record("float", node, None)
            else:
                choice[detail[0]] = detail[1]
                record(f"method {detail[1]}", node, detail[0])
        # pass 2: the target still fails: leave the remaining nodes in float, in ranking order
        for node in order:
            if tgt.met(value) or stopped or out_of_budget():
                break
            if node in exclude:
                continue
            tried += 1
            step += 1
            exclude.append(node)
            record("float", node, None)
    value, q, exclude, choice = best
    advice = Advice(qdq=q, exclude=exclude, curve=curve, methods=dict(choice), target=tgt, metric=value,
                    met=tgt.met(value), base_method=base, sensitivity=sens, seconds=time.perf_counter() - t0,
                    changed={t: m for t, m in choice.items() if m != base}, skipped=skipped,
                    stopped=stopped[0] if stopped else ("target met" if tgt.met(value) else "every node tried"),
                    base_scores=base_scores)
    if output is not None:
        advice.save(output)
    if not advice.met:
        err = TargetNotMet(
            f"target {tgt} not met: best {tgt.metric} = {value:.6g} with {len(exclude)} float nodes after "
            f"{len(curve) - 1} steps" + (f", stopped by {stopped[0]}" if stopped else "")
            + (f" (best model written to {output})" if output is not None else ""),
            hint=_fp32_hint(tgt, last.get("metrics")))
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


def _step(tm: TensorMap, node: str, choice, by, ev: Evaluator, outputs, tgt: Target, progress, step: int,
          now: float | None = None) -> tuple[str, tuple[str, str] | None, float, float]:
    """Measure X in float against X's tensors under other methods on ``ev``'s samples (and the current
    model beside them unless its score there, ``now``, is known); return the better action, its score and
    the current model's score on the same samples."""
    base_proto = copy.deepcopy(tm.qdq.proto)
    cands = _candidates(tm, node, choice, by, base_proto)
    proto, where = build_multi(base_proto, [v for v, _ in cands], outputs)
    prune(proto, {t for w in where.values() for t in w.values()})
    sessions = [Session(proto, where)]
    if now is None:
        sessions.append(Session(base_proto, {"current": {o: o for o in outputs}}))
    metrics, _ = ev.evaluate(sessions, stage=f"advise step {step} candidates", progress=progress)
    scores = {v.name: metrics[v.name].value(tgt.metric) for v, _ in cands}
    if now is None:
        now = metrics["current"].value(tgt.metric)
    float_score = scores["float"]
    best_m = max((c for c in cands if c[1] is not None), key=lambda c: scores[c[0].name], default=None)
    if best_m is not None and scores[best_m[0].name] >= float_score:
        return "method", best_m[1], scores[best_m[0].name], now
    return "float", None, float_score, now
