"""How the core measures models: output metrics in one pass, the 'best' key, bias correction kept or not."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from calib.compare import compare, load_metric, write_html
from calib.compare.evaluate import Evaluator
from calib.compare.paired import paired_gain
from calib.compare.targets import UserMetric
from calib.export.bias import correct_bias
from calib.model import Model

__all__ = ["BC_SUFFIX", "task_metrics", "score_outputs", "score_methods", "best_key", "methods_first",
           "compare_model", "bias_correct", "bias_into_advice", "key_metric", "transform_record", "score_pair",
           "keep_change"]

Progress = Callable[[str, int, "int | None"], None]
TRANSFORM_MIN_T = 0.0  # standard errors a transform (bias correction included) must gain by (keep_change)
BC_SUFFIX = "+bc"  # a method's label with bias correction, as scored by the 'best' chooser


def task_metrics(report) -> dict[str, Any]:
    """The output metrics of a ``CompareReport`` (or its ``outputs`` dict, as ``OutputMetrics.result()``
    gives) as one flat dict (single-output models: that output; several outputs: the worst value of each
    metric, so a summary never hides a bad output)."""
    outputs = report if isinstance(report, dict) else report.outputs
    outs = {k: v for k, v in outputs.items() if not k.startswith("_")}
    flat: dict[str, Any] = {}
    for r in outs.values():
        for k, v in r.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            better_high = not any(x in k for x in ("error", "abs"))
            if k not in flat:
                flat[k] = v
            else:
                flat[k] = min(flat[k], v) if better_high else max(flat[k], v)
    if "cosine" in flat:
        flat["output_cosine"] = flat["cosine"]
    user = outputs.get("_user_metric")
    if user:
        flat["metric"] = user.get("value")
    return flat


def score_outputs(model: Model, protos: dict[str, Any], source, *, batch_size: int, metric: str = "",
                  providers: Sequence[str] | None = None, progress: Progress | None = None,
                  stage: str = "scoring") -> dict[str, Any]:
    """``OutputMetrics`` of each whole model (label -> proto) on ``source`` in one pass: the FP32 model
    runs once per batch and every model beside it, graph outputs only (no per-layer taps)."""
    user = UserMetric.wrap(load_metric(metric)) if metric else None
    ev = Evaluator(model, source, batch_size=batch_size, user=user, providers=providers, cache_bytes=0)
    return ev.score(protos, stage=stage, progress=progress)


def score_methods(model: Model, qdqs: dict[str, Any], source, *, batch_size: int, metric: str = "",
                  providers: Sequence[str] | None = None, progress: Progress | None = None,
                  stage: str = "scoring methods") -> dict[str, dict]:
    """Output metrics (``task_metrics``) of each Q/DQ model (label -> QdqModel) on ``source`` in one pass."""
    metrics = score_outputs(model, {label: q.model for label, q in qdqs.items()}, source, batch_size=batch_size,
                            metric=metric, providers=providers, progress=progress, stage=stage)
    return {label: task_metrics(m.result()) for label, m in metrics.items()}


def best_key(task: dict[str, Any], target: str) -> tuple[float, ...]:
    """What 'best' maximises: the target's metric if one is given, then output SQNR, then output cosine.

    Without a target the choice is by output SQNR, not top-1 agreement: agreement over a few hundred
    samples moves in steps of one sample, so methods a sample apart are a tie that noise decides, while
    SQNR measures every output value (the peers benchmark has a case: magika, 100 samples, entropy 98 %
    vs mse 96 % top-1 agreement while mse had 4 dB more SQNR and kept 2.5 points more on held-out data).
    """
    def num(k: str) -> float:
        v = task.get(k)
        return float(v) if isinstance(v, (int, float)) and v == v else float("-inf")

    key = _TARGET_KEYS.get(target.split(":", 1)[0], "") if target else ""
    return tuple(num(k) for k in ([key] if key else []) + ["sqnr_db", "cosine"])


_TARGET_KEYS = {"top1": "top1_agreement", "accuracy": "accuracy_int8", "cosine": "cosine", "sqnr": "sqnr_db",
                "metric": "metric"}


def key_metric(target: str) -> str:
    """The metric ``best_key`` compares first: the target's, else output SQNR."""
    return (_TARGET_KEYS.get(target.split(":", 1)[0], "") if target else "") or "sqnr_db"


def transform_record(name: str, nodes: Sequence[str], kept: bool, sel: dict | None, held: dict | None, *,
                     target: str, why: str, in_sample: bool = False, paired: dict | None = None) -> dict[str, Any]:
    """One entry of the run's ``transforms`` list: what a transform changed, whether it was kept, and what it
    gave (with minus without, in ``metric``) on the selection samples and on the held-out/report samples
    (``sel``/``held``: ``{"with": task metrics, "without": task metrics}``; None: not measured)."""
    k = key_metric(target)

    def delta(m: dict | None) -> float | None:
        if not m:
            return None
        a, b = m["with"].get(k), m["without"].get(k)
        ok = all(isinstance(v, (int, float)) and v == v for v in (a, b))
        return float(a - b) if ok else None

    out = {"name": name, "kept": bool(kept), "nodes": list(nodes), "metric": k, "selection_delta": delta(sel),
           "held_out_delta": delta(held), "held_out_in_sample": bool(in_sample and held), "why": why}
    if paired is not None:
        out["selection_paired"] = paired  # the paired per-sample test that decided (calib.compare.paired)
    return out


def score_pair(model: Model, without, with_, source, *, batch_size: int, metric: str, providers,
               progress: Progress | None, stage: str, outputs: bool = False):
    """Task metrics of two Q/DQ protos (``without`` / ``with`` a transform) on ``source`` in one pass (with
    ``outputs``: also their ``OutputMetrics``, for ``keep_change``)."""
    outs = score_outputs(model, {"without": without, "with": with_}, source, batch_size=batch_size, metric=metric,
                         providers=providers, progress=progress, stage=stage)
    ms = {k: task_metrics(m.result()) for k, m in outs.items()}
    return (ms, outs) if outputs else ms


def keep_change(outs: dict[str, Any], target: str) -> tuple[bool, dict[str, Any] | None]:
    """Whether the ``with`` model of a transform beats the ``without`` one on the selection samples.

    Without a target (the default path): the paired per-sample comparison of ``calib.compare.paired`` (a
    positive mean gain in per-sample output error, by more than ``TRANSFORM_MIN_T`` standard errors: 0, as
    measured best, see ``calib.compare.auto``; a tie keeps the model as it was). With a target, or samples
    without ids: ``best_key`` strictly better. Also the paired gain (JSON: mean, se, t, n, wins)."""
    without, with_ = outs["without"], outs["with"]
    if not target and without.samples.err2 and with_.samples.err2:
        g = paired_gain(without.samples, with_.samples)
        return g.significant(TRANSFORM_MIN_T), g.to_json()
    return best_key(task_metrics(with_.result()), target) > best_key(task_metrics(without.result()), target), None


def methods_first(primary: str, labels: Sequence[str]) -> list[str]:
    return [primary] + [m for m in labels if m != primary]


def compare_model(model: Model, qdq_proto, eval_source, *, batch_size: int, metric: str, stats, methods,
                  progress: Progress | None, html: Path | None, json_path: Path | None,
                  advice: dict | None = None, title: str | None = None):
    """Per-layer FP32 vs Q/DQ comparison, saved as JSON and (optionally) an HTML report."""
    rep = compare(model, qdq_proto, eval_source, batch_size=batch_size,
                  metric=load_metric(metric) if metric else None, progress=progress)
    if json_path is not None:
        rep.save(json_path)
    if html is not None:
        extra: dict[str, Any] = {"advice": advice} if advice else {}
        if title:
            extra["title"] = title
        write_html(html, rep, stats=stats, methods=list(methods), **extra)
    return rep


def bias_correct(model: Model, qdq, source, ev, *, batch_size: int, limit: int | None, target: str,
                 metric: str, providers, progress) -> tuple[Any, dict[str, Any], dict[str, Any] | None]:
    """Bias-correct ``qdq`` on ``source``; with selection samples keep the result only if it scores at least as
    well. Returns the model to use, what was done (JSON-ready) and the output metrics of both versions."""
    bc = correct_bias(model, qdq, source, batch_size=batch_size, limit=limit, providers=providers,
                      progress=progress)
    info: dict[str, Any] = {**bc.to_json(), "kept": True, "why": "no selection samples: applied as measured"}
    if ev is None:
        return bc.qdq, info, None
    outs = score_outputs(model, {"without": qdq.model, "with": bc.qdq.model}, ev, batch_size=batch_size,
                         metric=metric, providers=providers, progress=progress, stage="bias correction: scoring")
    ms = {k: task_metrics(m.result()) for k, m in outs.items()}
    keep, gain = keep_change(outs, target)
    info.update(kept=keep, scores=ms, why="scored better on the selection samples" if keep
                else "the corrected model did not score better on the selection samples")
    if gain is not None:
        info["paired"] = gain
    info["_nodes"] = sorted(n for n, v in bc.shifts.items() if v.any())
    info["_corrected"] = bc.qdq  # the corrected model even when not kept (its held-out effect); not JSON
    return (bc.qdq if keep else qdq), info, outs


def bias_into_advice(adv, qdq, info: dict[str, Any], outs: dict[str, Any] | None) -> None:
    """Make the advice describe the model written: the corrected one when it was kept."""
    adv.qdq = qdq
    adv.bias = {k: v for k, v in info.items() if k != "scores"}
    if info["kept"] and outs is not None:
        adv.metric = outs["with"].value(adv.target.metric)
        adv.met = adv.target.met(adv.metric)
        adv.curve.append({"step": len(adv.curve), "action": "bias correction", "node": None,
                          "n_float_nodes": len(adv.exclude), "metric": adv.metric})
