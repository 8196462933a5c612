"""The one orchestration core: a plan of steps that ``quantize``, ``execute`` (``calib run``, the demo) and
the dashboard all run.

    collect -> calibrate -> choose ranges -> advise -> equalize -> deployed -> transforms -> verify -> write

(equalize: auto's FP32 transform candidates, ``calib.pipeline.candidates``; deployed: the target runtime's
check and fix, ``calib.pipeline.deployed``; it runs before bias correction, which edits only float biases,
added after the integer accumulation, so the check holds for the corrected model too.)

``quantize`` is ``execute`` with a ``RunConfig`` built from its flags (``config_from_flags``) and a
``FileSink`` (the paths the user named) instead of a ``RunSink`` (a run directory). Nothing here draws
progress or prints.
"""

from __future__ import annotations

import contextlib

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from calib.calibrate import Ranges, parse_method, save_ranges, weight_ranges
from calib.compare.ray_eval import RayEvaluation
from calib.config import AUTO_TRANSFORMS, CHOOSER_NAMES, DEFAULT_BATCH_SIZE, RunConfig
from calib.data.split import DEFAULT_SELECT_FRACTION
from calib.export.precision import resolve_target
from calib.export.trt_cache import DEFAULT_TRT_VERSION
from calib.compare.metrics import safe_float
from calib.errors import CalibError, InputDataError, TargetNotMet
from calib.io import write_json
from calib.model import Model, load_model
from calib.compare.evaluate import References, recording, sharing_references
from calib.pipeline.budget import Budget, run_seconds, warm_reference
from calib.pipeline.candidates import equalize_step
from calib.pipeline.deployed import deployed_step
from calib.pipeline.inputs import open_run_data, sample_subset, stats_key, subset_by_ids
from calib.pipeline.sinks import FileSink, RunSink, shipped_path, write_artifacts
from calib.pipeline.steps import (Context, advise_step, calibrate_step, choose_step, collect_step, split_step,
                                  transforms_step, verify_step)
from calib.runs import Run, RunStore, fingerprint_path
from calib.stats import ActivationStats

__all__ = ["quantize", "execute", "QuantizeResult", "config_from_flags", "run_plan", "summary", "STEPS",
           "DEFAULT_METHODS"]

Progress = Callable[[str, int, "int | None"], None]
DEFAULT_METHODS = ("entropy", "minmax", "percentile", "mse")
# after collect and calibrate; each step reads and fills the Context (calib.pipeline.steps)
STEPS = (("choose", choose_step), ("advise", advise_step), ("equalize", equalize_step), ("deployed", deployed_step),
         ("transforms", transforms_step), ("verify", verify_step))


@dataclass
class QuantizeResult:
    output: Path
    method: str
    ranges: dict[str, Ranges]
    stats: ActivationStats
    excluded: list[str] = field(default_factory=list)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # method (maybe +bc) -> output metrics
    best: str | None = None
    advice: Any = None
    artifacts: dict[str, Path] = field(default_factory=dict)
    target_met: bool | None = None
    bias: dict[str, Any] | None = None  # bias correction: nodes, samples, largest shifts, kept or not and why
    shipped: dict[str, Any] = field(default_factory=dict)  # output metrics of the model written
    remainder: dict[str, Any] = field(default_factory=dict)  # the same with an FP32 remainder (fp16/bf16 only)
    path: str = ""  # how it was made: method + transforms + float nodes
    deployed: dict[str, Any] | None = None  # the target runtime's check (calib.pipeline.deployed)
    transforms: list[dict[str, Any]] = field(default_factory=list)  # auto's transform candidates, kept or not
    budget: dict[str, Any] | None = None  # the run's time budget: seconds, used, what it cut (None: no budget)
    budget_line: str = ""  # the same in one line
    ort_bias: dict[str, Any] | None = None  # biases ONNX Runtime's default optimisation overflows (export.ort_bias)


def check_config(cfg: RunConfig) -> None:
    """Refuse combinations no step can honour, before any work."""
    if cfg.target and cfg.exclude:
        raise InputDataError("exclude with a target: advise chooses the float nodes itself",
                             hint="drop the exclude list, or drop the target and exclude by hand")


def run_plan(ctx: Context, sink) -> Context:
    """Execute the plan on ``ctx`` into ``sink`` (a ``FileSink`` or a ``RunSink``)."""
    with sink.timing("collect"):
        reuse = sink.reuse_stats()
        collect_step(ctx, reuse, sink.collector())
        if reuse is None and (p := sink.path("stats", "stats.npz")) is not None:
            ctx.stats.save(p)
            sink.seal("stats")
    sink.record(n_samples=ctx.stats.n_samples)
    with sink.timing("calibrate"):
        calibrate_step(ctx)
        if (p := sink.path("ranges", "ranges.json")) is not None:
            save_ranges(p, ctx.ranges, weight_ranges(ctx.model), ctx.stats)
    split_step(ctx)
    if ctx.split is not None:
        sink.record(split=ctx.split, in_sample=ctx.in_sample)
    ctx.budget = Budget(run_seconds(ctx.cfg), started=ctx.started)
    with _evaluation(ctx.cfg), sharing_references(References()), recording(ctx.budget.pace):
        warm_reference(ctx)
        for name, step in STEPS:
            with sink.timing(name):
                step(ctx)
            if name == "choose":
                sink.record(method=ctx.method, metrics_by_method=ctx.scores)
    sink.record(deployed=safe_float(ctx.deployed), transforms=safe_float(ctx.transforms),
                budget=ctx.budget.to_json())
    with sink.timing("write"):
        write_artifacts(ctx, sink)
    return ctx


def _evaluation(cfg: RunConfig):
    """``[compute] backend = "ray"``: scoring, auto, sensitivity and advise run on Ray too (same results)."""
    if cfg.backend != "ray":
        return contextlib.nullcontext()
    return RayEvaluation(cfg.num_workers, address=cfg.address or None)  # imports Ray (the [ray] extra) then


def summary(ctx: Context) -> dict[str, Any]:
    """The run's metrics: the shipped model's numbers first, then the path that got there."""
    out: dict[str, Any] = {k: v for k, v in ctx.shipped.items() if isinstance(v, (int, float, str))}
    out.update(method=ctx.method, path=shipped_path(ctx), transforms=list(ctx.done), in_sample=ctx.in_sample)
    if ctx.precision:
        out["high_precision"] = ctx.precision
    out.update({f"fp32_remainder_{k}": v for k, v in ctx.remainder.items() if isinstance(v, (int, float))})
    if ctx.bias is not None:
        out["bias_correction"] = "kept" if ctx.bias["kept"] else "not kept"
    if ctx.deployed is not None:
        out["deployed"] = ctx.deployed["line"]
    if ctx.advice is not None:
        out.update(target=ctx.cfg.target, target_met=bool(ctx.advice.met), float_nodes=len(ctx.advice.exclude),
                   advised_metric=ctx.advice.metric, stopped=ctx.advice.stopped, target_gap=ctx.advice.gap)
    if ctx.budget.seconds is not None:
        out["time_budget"] = ctx.budget.line()
    return out


def config_from_flags(model: str | os.PathLike, data: str | os.PathLike, *, method: str = "auto",
                      cache: bool = False, eval_data: str | os.PathLike | None = None, target: str = "",
                      placement: str = "trt", exclude: Sequence[str] = (), batch_size: int = DEFAULT_BATCH_SIZE,
                      limit: int | None = None, providers: Sequence[str] | None = None, metric: str = "",
                      bias_correction: bool = False, bias_samples: int | None = 128, max_float_nodes: int = 0,
                      time_budget_s: float = 0.0, preprocess: dict | None = None,
                      high_precision: str | None = None, keep_fp32: Sequence[str] = (),
                      trt_version: int = DEFAULT_TRT_VERSION,
                      select_fraction: float = DEFAULT_SELECT_FRACTION, deploy_cpu: str = "",
                      auto_transforms: Sequence[str] | None = None) -> RunConfig:
    """The ``RunConfig`` of ``calib quantize``'s flags (the same run ``calib run`` makes from a config).

    ``high_precision`` None: the placement's profile (trt -> fp16, ort -> fp32; ``resolve_target``)."""
    placement, high_precision = resolve_target(None, placement, high_precision)
    methods = list(DEFAULT_METHODS)
    if method not in CHOOSER_NAMES and parse_method(method).label not in methods:
        methods.append(parse_method(method).label)
    return RunConfig(name=Path(model).stem, model=Path(model), providers=list(providers or ["cpu"]),
                     calib_data=Path(data), eval_data=Path(eval_data) if eval_data is not None else None,
                     batch_size=batch_size, limit=limit or 0, methods=methods, primary=method,
                     placement=placement, exclude=list(exclude), cache=cache, all_methods=False,
                     bias_correction=bias_correction, bias_samples=bias_samples or 0, compare=True,
                     compare_metric=metric, html=False, target=target, max_float_nodes=max_float_nodes,
                     time_budget_s=time_budget_s, preprocess=preprocess or {}, high_precision=high_precision,
                     keep_fp32=list(keep_fp32), trt_version=trt_version, select_fraction=select_fraction,
                     deploy_cpu=deploy_cpu,
                     auto_transforms=list(AUTO_TRANSFORMS if auto_transforms is None else auto_transforms))


def quantize(model_path: str | os.PathLike, data: str | os.PathLike, output: str | os.PathLike, *,
             method: str = "auto", cache: str | os.PathLike | None = None,
             report: str | os.PathLike | None = None, eval_data: str | os.PathLike | None = None,
             target: str = "", placement: str = "trt", exclude: Sequence[str] = (),
             batch_size: int = DEFAULT_BATCH_SIZE, limit: int | None = None,
             providers: Sequence[str] | None = None, metric: str = "", bias_correction: bool = False,
             bias_samples: int | None = 128, stats_out: str | os.PathLike | None = None,
             max_float_nodes: int = 0, time_budget_s: float = 0.0, progress: Progress | None = None,
             preprocess: dict | None = None, high_precision: str | None = None, keep_fp32: Sequence[str] = (),
             trt_version: int = DEFAULT_TRT_VERSION, select_fraction: float = DEFAULT_SELECT_FRACTION,
             deploy_cpu: str = "", auto_transforms: Sequence[str] | None = None,
             stats: ActivationStats | None = None) -> QuantizeResult:
    """Collect, calibrate, choose, (advise toward ``target``), transform, verify and write to files.

    ``stats``: statistics already collected on ``data`` (``calib export --method auto``): no collection pass.

    ``bias_correction``: correct each quantized layer's bias on the first ``bias_samples`` calibration
    samples; with evaluation data kept only if it scores better. ``stats_out``: also write the
    statistics (``calib advise --stats`` reads them). A missed target writes everything for the best model
    found, then raises ``TargetNotMet`` (its ``result`` says what was written).
    """
    cfg = config_from_flags(model_path, data, method=method, cache=cache is not None, eval_data=eval_data,
                            target=target, placement=placement, exclude=exclude, batch_size=batch_size,
                            limit=limit, providers=providers, metric=metric, bias_correction=bias_correction,
                            bias_samples=bias_samples, max_float_nodes=max_float_nodes,
                            time_budget_s=time_budget_s, preprocess=preprocess, high_precision=high_precision,
                            keep_fp32=keep_fp32, trt_version=trt_version, select_fraction=select_fraction,
                            deploy_cpu=deploy_cpu, auto_transforms=auto_transforms)
    check_config(cfg)
    model = load_model(model_path)
    source = open_run_data(Path(data), model, preprocess=cfg.preprocess)
    ev = open_run_data(Path(eval_data), model, preprocess=cfg.preprocess) if eval_data is not None else None
    sink = FileSink(Path(output), cache=Path(cache) if cache else None, report=Path(report) if report else None,
                    stats_out=Path(stats_out) if stats_out else None, stats=stats)
    ctx = run_plan(Context(cfg, model, source, ev, progress), sink)
    res = QuantizeResult(Path(output), ctx.method, ctx.ranges, ctx.stats, metrics=ctx.scores, best=ctx.best,
                         bias=ctx.bias, shipped=ctx.shipped, remainder=ctx.remainder,
                         path=shipped_path(ctx), deployed=ctx.deployed, transforms=ctx.transforms,
                         budget=ctx.budget.to_json() if ctx.budget.seconds is not None else None,
                         budget_line=ctx.budget.line(), ort_bias=ctx.ort_bias)
    if ctx.advice is not None:
        res.advice, res.target_met, res.excluded = ctx.advice, bool(ctx.advice.met), list(ctx.advice.exclude)
        res.artifacts["advice"] = sink.path("advise", "")
    res.artifacts["model"] = Path(output)
    for key in ("cache", "scales", "stats"):
        if (p := sink.path(key, "")) is not None:
            res.artifacts["report" if key == "scales" else key] = p
    if ctx.missed is not None:
        err = TargetNotMet(f"{ctx.missed}; best model found written to {output}", hint=ctx.missed.hint)
        err.advice, err.result = ctx.advice, res
        raise err
    return res


# ---- recorded runs -------------------------------------------------------------------


def execute(cfg: RunConfig, *, store: RunStore | None = None, command: list[str] | None = None,
            progress: Progress | None = None, calib_ids: Sequence[str] | None = None) -> Run:
    """Run ``cfg`` into a new run directory; the run is marked finished only at the very end.

    ``calib_ids``: restrict the calibration set to these sample ids (the dashboard's edited calibration
    set); recorded in the run as ``calib_ids.json``. A missed target still writes every artifact of the
    best model found; the run is marked ``target-missed`` and ``TargetNotMet`` (with ``.run``) is raised.
    """
    check_config(cfg)
    store = store or RunStore(cfg.store)
    model = load_model(cfg.model)
    data_fp = fingerprint_path(cfg.calib_data)
    run = store.create(cfg.name, command=command, config=cfg.to_dict(), method=cfg.primary,
                       model={"path": str(Path(cfg.model).resolve()), "sha256": model.sha256,
                              "notes": model.notes},
                       data={"path": str(Path(cfg.calib_data).resolve()), "fingerprint": data_fp,
                             "eval": str(Path(cfg.eval_data).resolve()) if cfg.eval_data else ""})
    try:
        ctx = _execute(cfg, run, store, model, data_fp, progress, calib_ids)
    except KeyboardInterrupt:
        run.update(status="incomplete", error="interrupted")
        raise
    except BaseException as e:
        run.fail(f"{type(e).__name__}: {e}" if not isinstance(e, CalibError) else str(e))
        raise
    if ctx.missed is not None:
        run.complete(status="target-missed", outcome=str(ctx.missed))
        err = TargetNotMet(f"{ctx.missed}; run {run.id} has the best model found", hint=ctx.missed.hint)
        err.advice, err.run = ctx.advice, run
        raise err
    run.complete()
    return run


def _run_sources(cfg: RunConfig, run: Run, model: Model, progress, calib_ids):
    """The calibration and evaluation sources of a run (preprocessing, edited set or sampling recorded)."""
    source = open_run_data(cfg.calib_data, model, preprocess=cfg.preprocess, skip_bad=cfg.skip_bad)
    spec = getattr(source, "spec", None)
    if spec is not None and hasattr(spec, "to_dict"):
        write_json(run.add_artifact("preprocess", "preprocess.json"), spec.to_dict())
    if calib_ids is not None:
        source = subset_by_ids(source, calib_ids)
        write_json(run.add_artifact("calib_ids", "calib_ids.json"), list(calib_ids))
    elif cfg.sampling_strategy and cfg.sampling_n:
        with run.timing("sample"):
            source, sel = sample_subset(source, model, strategy=cfg.sampling_strategy, n=cfg.sampling_n,
                                        seed=cfg.sampling_seed, data=str(cfg.calib_data),
                                        batch_size=cfg.batch_size, progress=progress)
        write_json(run.add_artifact("subset", "subset.json"), sel.to_dict())
    ev = open_run_data(cfg.eval_data, model, preprocess=cfg.preprocess, skip_bad=cfg.skip_bad) \
        if cfg.eval_data else None
    return source, ev


def _execute(cfg: RunConfig, run: Run, store: RunStore, model: Model, data_fp: str,
             progress: Progress | None, calib_ids: Sequence[str] | None) -> Context:
    source, ev = _run_sources(cfg, run, model, progress, calib_ids)
    key = stats_key(model, model.activation_tensors(),
                    {"limit": cfg.limit, "ids": list(calib_ids) if calib_ids else None,
                     "sampling": [cfg.sampling_strategy, cfg.sampling_n, cfg.sampling_seed],
                     "preprocess": cfg.preprocess})
    sink = RunSink(run, store, model_sha256=model.sha256, data_fingerprint=data_fp, key=key,
                   method_files="all" if cfg.all_methods or cfg.primary == "best" else "chosen", reports=True)
    ctx = run_plan(Context(cfg, model, source, ev, progress, subset=calib_ids is not None), sink)
    run.set_metrics(summary(ctx))
    return ctx
