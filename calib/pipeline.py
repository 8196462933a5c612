"""The whole loop as one call: collect -> calibrate -> export -> compare -> advise.

``quantize`` is the one-shot path (``calib quantize``): files in, files out.
``execute`` runs a ``RunConfig`` into a run directory of a ``RunStore``
(``calib run``, ``calib demo``, the dashboard's "new run" and "re-calibrate").
Both use the same steps; nothing here draws progress or prints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from calib.calibrate import Ranges, calibrate_all, parse_method, save_ranges, weight_ranges
from calib.collect import collect
from calib.config import RunConfig
from calib.data.preprocess import stamp_model
from calib.errors import CalibError, InputDataError, TargetNotMet
from calib.model import Model, load_model
from calib.recalibrate import collect_into_run
from calib.runs import Run, RunStore, fingerprint_path
from calib.stats import ActivationStats

__all__ = ["quantize", "execute", "QuantizeResult", "method_file_label", "open_run_data"]

log = logging.getLogger(__name__)
Progress = Callable[[str, int, "int | None"], None]


BC_SUFFIX = "+bc"  # a method's label with bias correction, as scored by quantize --method best --bias-correction


def method_file_label(label: str) -> str:
    return label.replace(":", "-")


@dataclass
class QuantizeResult:
    output: Path
    method: str
    ranges: dict[str, Ranges]
    stats: ActivationStats
    excluded: list[str] = field(default_factory=list)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> task metrics
    best: str | None = None
    advice: Any = None
    artifacts: dict[str, Path] = field(default_factory=dict)
    target_met: bool | None = None
    bias: dict[str, Any] | None = None  # bias correction: nodes, samples, largest shifts, kept or not and why


def open_run_data(path: Path, model: Model, *, preprocess: dict | None = None, skip_bad: bool = False):
    """Open a data path (arrays, image folder, manifest, tokens) with an optional preprocessing spec."""
    from calib.data.sources import open_source

    spec = None
    if preprocess:
        from calib.data.preprocess import PreprocessSpec

        spec = PreprocessSpec.from_dict(preprocess)
    return open_source(path, model, spec=spec, skip_bad=skip_bad)


def _stats_key(model: Model, tensors: Sequence[str], extra: dict) -> str:
    h = hashlib.sha256()
    h.update(model.sha256.encode())
    h.update("\0".join(tensors).encode())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


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


def _compare_method(model: Model, qdq_proto, eval_source, *, batch_size: int, metric: str, stats, ranges,
                    progress: Progress | None, html: Path | None, json_path: Path | None):
    from calib.compare import compare, load_metric, write_html

    rep = compare(model, qdq_proto, eval_source, batch_size=batch_size,
                  metric=load_metric(metric) if metric else None, progress=progress)
    if json_path is not None:
        rep.save(json_path)
    if html is not None:
        write_html(html, rep, stats=stats, methods=list(ranges) if ranges else ("minmax", "percentile", "entropy",
                                                                                  "mse"))
    return rep


def score_outputs(model: Model, protos: dict[str, Any], source, *, batch_size: int, metric: str = "",
                  providers: Sequence[str] | None = None, progress: Progress | None = None,
                  stage: str = "scoring") -> dict[str, Any]:
    """``OutputMetrics`` of each whole model (label -> proto) on ``source`` in one pass: the FP32 model
    runs once per batch and every model beside it, graph outputs only (no per-layer taps)."""
    from calib.compare import load_metric
    from calib.compare.evaluate import Evaluator
    from calib.compare.targets import UserMetric

    user = UserMetric.wrap(load_metric(metric)) if metric else None
    ev = Evaluator(model, source, batch_size=batch_size, user=user, providers=providers, cache_bytes=0)
    return ev.score(protos, stage=stage, progress=progress)


def score_methods(model: Model, qdqs: dict[str, Any], source, *, batch_size: int, metric: str = "",
                  providers: Sequence[str] | None = None, progress: Progress | None = None) -> dict[str, dict]:
    """Output metrics (``task_metrics``) of each method's Q/DQ model on ``source`` in one pass."""
    metrics = score_outputs(model, {label: q.model for label, q in qdqs.items()}, source, batch_size=batch_size,
                            metric=metric, providers=providers, progress=progress, stage="scoring methods")
    return {label: task_metrics(m.result()) for label, m in metrics.items()}


def _score(task: dict[str, Any], target: str) -> tuple[float, ...]:
    """What 'best' maximises: the target's metric if one is given, then output SQNR, then output cosine.

    Without a target the choice is by output SQNR, not top-1 agreement: agreement over a few hundred
    samples moves in steps of one sample, so methods a sample apart are a tie that noise decides, while
    SQNR measures every output value (the peers benchmark has a case: magika, 100 samples, entropy 98 %
    vs mse 96 % top-1 agreement while mse had 4 dB more SQNR and kept 2.5 points more on held-out data).
    """
    def num(k: str) -> float:
        v = task.get(k)
        return float(v) if isinstance(v, (int, float)) and v == v else float("-inf")

    key = {"top1": "top1_agreement", "accuracy": "accuracy_int8", "cosine": "cosine", "sqnr": "sqnr_db",
           "metric": "metric"}.get(target.split(":", 1)[0], "") if target else ""
    return tuple(num(k) for k in ([key] if key else []) + ["sqnr_db", "cosine"])


def _methods_first(primary: str, labels: Sequence[str]) -> list[str]:
    return [primary] + [m for m in labels if m != primary]


def quantize(model_path: str | os.PathLike, data: str | os.PathLike, output: str | os.PathLike, *,
             method: str = "entropy", cache: str | os.PathLike | None = None,
             report: str | os.PathLike | None = None, eval_data: str | os.PathLike | None = None,
             target: str = "", placement: str = "trt", exclude: Sequence[str] = (), batch_size: int = 8,
             limit: int | None = None, providers: Sequence[str] | None = None, metric: str = "",
             bias_correction: bool = False, bias_samples: int | None = 128,
             progress: Progress | None = None, preprocess: dict | None = None) -> QuantizeResult:
    """Collect, calibrate, export; with eval data and a target, compare and advise.

    ``bias_correction``: correct each quantized layer's bias on the first ``bias_samples``
    calibration samples (``calib.export.bias``). With evaluation data the corrected model is
    kept only if it scores at least as well as the uncorrected one (``best`` scores both
    versions of every method in one pass); without, it is applied as measured.
    """
    from calib.export import export_qdq, scale_report, write_cache, write_scale_report
    from calib.export.bias import correct_bias

    output = Path(output)
    model = load_model(model_path)
    if (method == "best" or target) and eval_data is None:
        raise InputDataError("--method best and --target need --eval-data", hint="pass evaluation data")
    methods = ["entropy", "minmax", "percentile", "mse"]
    if method != "best":
        m = parse_method(method)
        if m.label not in methods:
            methods.append(m.label)
    source = open_run_data(Path(data), model, preprocess=preprocess)
    stats = collect(model, source, batch_size=batch_size, limit=limit, providers=providers, progress=progress)
    ranges = calibrate_all(stats, methods)
    result = QuantizeResult(output, method, ranges, stats)
    ev = open_run_data(Path(eval_data), model, preprocess=preprocess) if eval_data is not None else None
    chosen = method if method != "best" else None
    qdqs: dict[str, Any] = {}
    corrected: dict[str, Any] = {}
    if method == "best":
        qdqs = {label: export_qdq(model, r, placement=placement, exclude=exclude) for label, r in ranges.items()}
        if bias_correction and not target:  # every method's shifts in one pass, both versions of each scored
            # (with a target, advise re-exports from the ranges: the correction is made after it instead)
            corrected = correct_bias(model, qdqs, source, batch_size=batch_size, limit=bias_samples,
                                     providers=providers, progress=progress)
        scored = {**qdqs, **{label + BC_SUFFIX: bc.qdq for label, bc in corrected.items()}}
        result.metrics = score_methods(model, scored, ev, batch_size=batch_size, metric=metric, providers=providers,
                                       progress=progress)
        chosen = max(result.metrics, key=lambda k: _score(result.metrics[k], target))
        result.best = chosen
    use_bc = chosen.endswith(BC_SUFFIX)
    chosen_label = parse_method(chosen.removesuffix(BC_SUFFIX)).label
    qdq = qdqs.get(chosen_label) or export_qdq(model, ranges[chosen_label], placement=placement, exclude=exclude)
    if corrected:
        bc = corrected[chosen_label]
        result.bias = {**bc.to_json(), "kept": use_bc,
                       "why": "scored better on the evaluation data" if use_bc else
                       "the uncorrected model scored at least as well on the evaluation data"}
        qdq = bc.qdq if use_bc else qdq
    result.method = chosen_label
    if target:
        from calib.compare import advise

        from calib.compare import load_metric

        if exclude:
            raise InputDataError("--exclude with --target: advise chooses the float nodes itself",
                                 hint="drop --exclude, or drop --target and exclude by hand")
        adv = advise(model, stats, ev, target=target, methods=_methods_first(chosen_label, list(ranges)),
                     placement=placement, batch_size=batch_size, metric=load_metric(metric) if metric else None,
                     progress=progress)
        result.advice = adv
        result.target_met = bool(adv.met)
        qdq = adv.qdq
        result.excluded = list(adv.exclude)
    if bias_correction and not corrected:
        qdq, result.bias, outs = _bias_correct(model, qdq, source, ev, batch_size=batch_size, limit=bias_samples,
                                               target=target, metric=metric, providers=providers,
                                               progress=progress)
        if result.advice is not None:
            _bias_into_advice(result.advice, qdq, result.bias, outs)
            result.target_met = bool(result.advice.met)
    for q in {id(qdq): qdq, id(getattr(result.advice, "qdq", qdq)): getattr(result.advice, "qdq", qdq)}.values():
        stamp_model(q.model, getattr(source, "spec", None))  # the spec travels with the model (metadata_props)
    if result.advice is not None:
        _, side = result.advice.save(output)  # the model plus the exclude list and per-step curve beside it
        result.artifacts["advice"] = side
    else:
        qdq.save(output)
    result.artifacts["model"] = output
    if cache is not None:
        write_cache(cache, ranges[chosen_label])
        result.artifacts["cache"] = Path(cache)
    if report is not None:
        write_scale_report(report, scale_report(qdq, ranges, chosen=chosen_label, stats=stats))
        result.artifacts["report"] = Path(report)
    if result.advice is not None and not result.target_met:
        raise TargetNotMet(f"target {target} not met even with {len(result.excluded)} float nodes; "
                           f"best model kept at {output}", hint="relax the target or improve the calibration data")
    return result


def _bias_correct(model: Model, qdq, source, ev, *, batch_size: int, limit: int | None, target: str,
                  metric: str, providers, progress) -> tuple[Any, dict[str, Any], dict[str, Any] | None]:
    """Bias-correct ``qdq`` on ``source``; with evaluation data keep the result only if it scores at least as
    well. Returns the model to use, what was done (JSON-ready) and the output metrics of both versions."""
    from calib.export.bias import correct_bias

    bc = correct_bias(model, qdq, source, batch_size=batch_size, limit=limit, providers=providers,
                      progress=progress)
    info: dict[str, Any] = {**bc.to_json(), "kept": True, "why": "no evaluation data: applied as measured"}
    if ev is None:
        return bc.qdq, info, None
    outs = score_outputs(model, {"without": qdq.model, "with": bc.qdq.model}, ev, batch_size=batch_size,
                         metric=metric, providers=providers, progress=progress, stage="bias correction: scoring")
    ms = {k: task_metrics(m.result()) for k, m in outs.items()}
    keep = _score(ms["with"], target) >= _score(ms["without"], target)
    info.update(kept=keep, scores=ms, why="scored at least as well on the evaluation data" if keep
                else "the uncorrected model scored better on the evaluation data")
    return (bc.qdq if keep else qdq), info, outs


def _bias_into_advice(adv, qdq, info: dict[str, Any], outs: dict[str, Any] | None) -> None:
    """Make the advice describe the model written: the corrected one when it was kept."""
    adv.qdq = qdq
    adv.bias = {k: v for k, v in info.items() if k != "scores"}
    if info["kept"] and outs is not None:
        adv.metric = outs["with"].value(adv.target.metric)
        adv.met = adv.target.met(adv.metric)
        adv.curve.append({"step": len(adv.curve), "action": "bias correction", "node": None,
                          "n_float_nodes": len(adv.exclude), "metric": adv.metric})


# ---- recorded runs -------------------------------------------------------------------


def execute(cfg: RunConfig, *, store: RunStore | None = None, command: list[str] | None = None,
            progress: Progress | None = None, calib_ids: Sequence[str] | None = None) -> Run:
    """Run ``cfg`` into a new run directory; the run is marked complete only at the very end.

    ``calib_ids``: restrict the calibration set to these sample ids (the dashboard's
    edited calibration set); recorded in the run as ``calib_ids.json``.
    """
    store = store or RunStore(cfg.store)
    model = load_model(cfg.model)
    data_fp = fingerprint_path(cfg.calib_data)
    run = store.create(cfg.name, command=command, config=cfg.to_dict(), method=cfg.primary,
                       model={"path": str(Path(cfg.model).resolve()), "sha256": model.sha256,
                              "notes": model.notes},
                       data={"path": str(Path(cfg.calib_data).resolve()), "fingerprint": data_fp,
                             "eval": str(Path(cfg.eval_data).resolve()) if cfg.eval_data else ""})
    try:
        _execute(cfg, run, store, model, data_fp, progress, calib_ids)
    except KeyboardInterrupt:
        run.update(status="incomplete", error="interrupted")
        raise
    except BaseException as e:
        msg = f"{type(e).__name__}: {e}" if not isinstance(e, CalibError) else str(e)
        run.fail(msg)
        raise
    run.complete()
    return run


def _execute(cfg: RunConfig, run: Run, store: RunStore, model: Model, data_fp: str,
             progress: Progress | None, calib_ids: Sequence[str] | None) -> None:
    from calib.export import export_qdq, scale_report, write_cache, write_scale_report
    from calib.io import write_json

    source = open_run_data(cfg.calib_data, model, preprocess=cfg.preprocess, skip_bad=cfg.skip_bad)
    spec = getattr(source, "spec", None)
    if spec is not None and hasattr(spec, "to_dict"):
        write_json(run.add_artifact("preprocess", "preprocess.json"), spec.to_dict())
    if calib_ids is not None:
        source = _subset_by_ids(source, calib_ids)
        write_json(run.add_artifact("calib_ids", "calib_ids.json"), list(calib_ids))
    elif cfg.sampling_strategy and cfg.sampling_n:
        from calib.data.sampling import select

        with run.timing("sample"):
            sel = select(source, cfg.sampling_n, strategy=cfg.sampling_strategy, seed=cfg.sampling_seed,
                         model=model, progress=progress)
        source = _subset_by_ids(source, sel.ids)
        write_json(run.add_artifact("subset", "subset.json"), sel.to_dict())
    tensors = model.activation_tensors()
    key = _stats_key(model, tensors, {"limit": cfg.limit, "ids": list(calib_ids) if calib_ids else None,
                                      "sampling": [cfg.sampling_strategy, cfg.sampling_n, cfg.sampling_seed],
                                      "preprocess": cfg.preprocess})
    run.update(stats_key=key)
    reused = store.find_stats(model.sha256, data_fp, key)
    stats_path = run.add_artifact("stats", "stats.npz")
    with run.timing("collect"):
        if reused is not None:
            shutil.copyfile(reused, stats_path.with_name(".stats.npz.tmp"))
            os.replace(stats_path.with_name(".stats.npz.tmp"), stats_path)
            stats = ActivationStats.load(stats_path)
            run.update(stats_reused_from=str(reused.parent.name))
        else:
            stats = collect_into_run(run, model, source, batch_size=cfg.batch_size, limit=cfg.limit or None,
                                     providers=cfg.providers, progress=progress)  # shards: calib.recalibrate
            stats.save(stats_path)
    run.update(n_samples=stats.n_samples)
    with run.timing("calibrate"):
        ranges = calibrate_all(stats, cfg.methods)
        save_ranges(run.add_artifact("ranges", "ranges.json"), ranges, weight_ranges(model), stats)
    primary = cfg.primary if cfg.primary == "best" else parse_method(cfg.primary).label
    if primary != "best" and primary not in ranges:
        ranges.update(calibrate_all(stats, [primary]))
    ev = open_run_data(cfg.eval_data, model, preprocess=cfg.preprocess, skip_bad=cfg.skip_bad) \
        if cfg.eval_data else None
    labels = list(ranges) if (cfg.all_methods or primary == "best") else [primary]
    metrics: dict[str, dict] = {}
    qdqs = {}
    for label in labels:
        with run.timing(f"export:{label}"):
            q = export_qdq(model, ranges[label], placement=cfg.placement, exclude=cfg.exclude)
            q.save(run.add_artifact(f"qdq:{label}", f"model.{method_file_label(label)}.int8.onnx"))
            qdqs[label] = q
        if ev is not None and cfg.compare:
            with run.timing(f"compare:{label}"):
                rep = _compare_method(
                    model, q.model, ev, batch_size=cfg.batch_size, metric=cfg.compare_metric, stats=stats,
                    ranges=ranges, progress=progress,
                    html=run.add_artifact(f"report:{label}", f"report.{method_file_label(label)}.html")
                    if cfg.html else None,
                    json_path=run.add_artifact(f"compare:{label}", f"compare.{method_file_label(label)}.json"))
            metrics[label] = task_metrics(rep)
    if primary == "best":
        if not metrics:
            raise InputDataError("calibrate.primary = 'best' needs evaluation data and compare enabled")
        primary = max(metrics, key=lambda k: _score(metrics[k], cfg.target))
    run.update(method=primary, metrics_by_method=metrics)
    final = qdqs.get(primary) or export_qdq(model, ranges[primary], placement=cfg.placement, exclude=cfg.exclude)
    summary: dict[str, Any] = {"method": primary, **{k: v for k, v in metrics.get(primary, {}).items()
                                                      if isinstance(v, (int, float, str))}}
    if cfg.target:
        from calib.compare import advise

        from calib.compare import load_metric

        with run.timing("advise"):
            adv = advise(model, stats, ev, target=cfg.target, methods=_methods_first(primary, list(ranges)),
                         placement=cfg.placement, batch_size=cfg.batch_size,
                         metric=load_metric(cfg.compare_metric) if cfg.compare_metric else None,
                         max_steps=cfg.max_float_nodes or None, time_budget_s=cfg.time_budget_s or None,
                         sensitivity_samples=cfg.sensitivity_samples,
                         progress=progress)
        final = adv.qdq
    if cfg.bias_correction:
        with run.timing("bias correction"):
            final, info, outs = _bias_correct(
                model, final, source, ev if cfg.compare else None, batch_size=cfg.batch_size,
                limit=cfg.bias_samples or None, target=cfg.target, metric=cfg.compare_metric,
                providers=cfg.providers, progress=progress)
        from calib.compare.metrics import safe_float

        write_json(run.add_artifact("bias", "bias.json"), safe_float(info))
        summary["bias_correction"] = "kept" if info["kept"] else "not kept"
        if cfg.target:
            _bias_into_advice(adv, final, info, outs)
    if cfg.target:
        write_json(run.add_artifact("advise", "advise.json"), adv.to_json())
        summary.update({"target": cfg.target, "target_met": bool(adv.met), "float_nodes": len(adv.exclude),
                        "advised_metric": adv.metric})
    stamp_model(final.model, getattr(source, "spec", None))
    final.save(run.add_artifact("model", "model.int8.onnx"))
    if cfg.cache:
        write_cache(run.add_artifact("cache", "model.cache"), ranges[primary])
    write_scale_report(run.add_artifact("scales", "scales.json"),
                       scale_report(final, ranges, chosen=primary, stats=stats))
    if "report:" + primary in run.manifest.get("artifacts", {}) and cfg.html:
        shutil.copyfile(run.dir / run.manifest["artifacts"]["report:" + primary], run.dir / ".report.tmp")
        os.replace(run.dir / ".report.tmp", run.add_artifact("report", "report.html"))
    run.set_metrics(summary)


def _subset_by_ids(source, ids: Sequence[str]):
    """The samples of ``source`` with these ids, in this order, still read lazily."""
    have = source.ids() if hasattr(source, "ids") else [smp.id for smp in source]
    index = {sid: i for i, sid in enumerate(have)}
    missing = [i for i in ids if i not in index]
    if missing:
        raise InputDataError(f"sample '{missing[0]}' is not in the data ({len(missing)} id(s) missing)",
                             hint="the data changed since the subset was made; resample")
    if hasattr(source, "subset"):
        return source.subset([index[i] for i in ids])
    from calib.data import ListSource

    wanted = set(ids)
    picked = {smp.id: smp for smp in source if smp.id in wanted}
    return ListSource([picked[i] for i in ids], layout=getattr(source, "layout", "batch"), name="subset")
