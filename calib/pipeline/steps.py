"""The steps of the plan and their plug-in points.

A step takes the ``Context`` and fills in what it produced. Two registries make the steps pluggable:

- ``CHOOSERS``: the "choose ranges" step, keyed by ``RunConfig.primary``: a named method (``entropy``,
  ``percentile:99.99`` ... all handled by the ``"method"`` chooser), ``best`` (score every method on the
  selection samples), ``auto`` (per tensor), and any chooser registered later with ``register_chooser`` (e.g. ``auto``).
- ``TRANSFORMS``: model transforms applied after advise, in ``RunConfig.transforms`` order
  (``bias_correction`` today), each verified on the selection samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from calib.calibrate import Ranges, calibrate_all, parse_method
from calib.collect import collect
from calib.compare import Advice, advise, load_metric
from calib.compare.auto import AutoChoice, choose_auto
from calib.config import RunConfig
from calib.data.split import split_source
from calib.distributed import collect_sharded, resolve_max_memory
from calib.errors import ConfigError, TargetNotMet
from calib.export import QdqModel, export_qdq, flagged_tensors
from calib.export.bias import correct_bias
from calib.export.int32_bias import with_int32_biases
from calib.export.ort_bias import ort_bias_report
from calib.export.precision import RANGE_OPS, apply_high_precision
from calib.model import Model
from calib.pipeline.budget import (Budget, advise_seconds, auto_seconds, heldout_cost, transform_cost,
                                   verify_cost)
from calib.pipeline.inputs import mark_flagged
from calib.pipeline.scoring import (BC_SUFFIX, best_key, bias_correct, bias_into_advice, methods_first,
                                    score_methods, score_outputs, score_pair, task_metrics, transform_record)
from calib.stats import ActivationStats

__all__ = ["Context", "CHOOSERS", "TRANSFORMS", "register_chooser", "register_transform", "collect_step",
           "calibrate_step", "choose_step", "advise_step", "transforms_step", "verify_step", "final_ranges",
           "shipping_model", "export_shipped"]

Progress = Callable[[str, int, "int | None"], None]


@dataclass
class Context:
    """Everything one execution of the plan reads and produces."""

    cfg: RunConfig
    model: Model
    source: Any  # calibration samples
    ev: Any | None  # evaluation samples: what every reported figure is measured on (None: no scoring)
    progress: Progress | None = None
    stats: ActivationStats | None = None
    ranges: dict[str, Ranges] = field(default_factory=dict)  # method label -> Ranges
    flagged: dict[str, str] = field(default_factory=dict)  # tensor -> why it stays float (NaN/inf)
    candidates: dict[str, QdqModel] = field(default_factory=dict)  # method label -> its exported model
    scored: dict[str, QdqModel] = field(default_factory=dict)  # label (maybe +bc) -> the model scored
    scores: dict[str, dict] = field(default_factory=dict)  # label (maybe +bc) -> output metrics
    best: str | None = None  # what 'best' picked (with BC_SUFFIX when the corrected model won)
    method: str = ""  # the chosen method's label (advise may change single tensors: see final_ranges)
    qdq: QdqModel | None = None  # the model that ships
    advice: Advice | None = None
    missed: TargetNotMet | None = None  # advise missed the target: the best model found still ships
    bias: dict[str, Any] | None = None
    done: list[str] = field(default_factory=list)  # transforms applied
    shipped: dict[str, Any] = field(default_factory=dict)  # output metrics of the shipped model
    precision: str = ""  # what the fp16/bf16 remainder cast did (empty for fp32)
    kept_fp32: dict[str, Any] = field(default_factory=dict)  # the cast's keep-FP32 list: dtype, nodes and why
    remainder: dict[str, Any] = field(default_factory=dict)  # output metrics of the shipped model, fp32 remainder
    ort_bias: dict[str, Any] | None = None  # biases ONNX Runtime's default optimisation overflows (ort_bias)
    ship: tuple[QdqModel, QdqModel] | None = None  # (ctx.qdq, its fp16/bf16 cast) once cast
    sel: Any | None = None  # selection samples: what auto, best, advise and bias correction choose on
    split: dict[str, Any] | None = None  # how the calibration data was split (calib.data.split)
    in_sample: bool = False  # reported figures are on the calibration data's report part (no eval data)
    auto: AutoChoice | None = None  # the per-tensor choice of method 'auto'
    subset: bool = False  # the calibration source is an edited subset (the dashboard's calib_ids)
    base: Model | None = None  # the FP32 model the shipped one is exported from, when a kept transform edited it
    retuned: dict[str, Any] = field(default_factory=dict)  # tensor -> TensorRange re-calibrated after a transform
    floats: list[str] = field(default_factory=list)  # nodes/tensors a kept float region leaves float (ORT target)
    transforms: list[dict[str, Any]] = field(default_factory=list)  # auto's transform candidates: kept or not
    deployed: dict[str, Any] | None = None  # the deployed-runtime check (calib.pipeline.deployed)
    started: float = field(default_factory=time.perf_counter)  # when the run started (its budget counts from it)
    budget: Budget = field(default_factory=lambda: Budget(None))  # the run's deadline (calib.pipeline.budget)

    def export(self, label: str, exclude=None) -> QdqModel:
        c = self.cfg
        return export_qdq(self.model, self.ranges[label], placement=c.placement,
                          exclude=c.exclude if exclude is None else exclude, flagged=self.flagged)


Chooser = Callable[[Context], None]
Transform = Callable[[Context], None]
CHOOSERS: dict[str, Chooser] = {}
TRANSFORMS: dict[str, Transform] = {}


def register_chooser(name: str, fn: Chooser | None = None):
    """Register a "choose ranges" step for ``primary = name`` (usable as a decorator)."""
    def put(f: Chooser) -> Chooser:
        CHOOSERS[name] = f
        return f
    return put(fn) if fn is not None else put


def register_transform(name: str, fn: Transform | None = None):
    """Register a model transform for ``RunConfig.transforms`` (usable as a decorator)."""
    def put(f: Transform) -> Transform:
        TRANSFORMS[name] = f
        return f
    return put(fn) if fn is not None else put


def collect_step(ctx: Context, reuse: ActivationStats | None = None, collector: Callable | None = None) -> None:
    """Statistics: reused, or collected (by ``collector`` when the sink keeps per-shard statistics)."""
    c = ctx.cfg
    if reuse is not None:
        ctx.stats = reuse
    elif c.backend == "ray":
        ctx.stats = _collect_on_ray(ctx)
    elif collector is not None:
        ctx.stats = collector(ctx.model, ctx.source, batch_size=c.batch_size, limit=c.limit or None,
                              providers=c.providers, progress=ctx.progress)
    else:
        ctx.stats = collect(ctx.model, ctx.source, batch_size=c.batch_size, limit=c.limit or None,
                            providers=c.providers, progress=ctx.progress,
                            max_memory=resolve_max_memory(c.max_memory, 1))
    ctx.flagged = flagged_tensors(ctx.stats)


def _collect_on_ray(ctx: Context) -> ActivationStats:
    """``[compute] backend = "ray"``: shards of the calibration data collected by Ray tasks that read their
    own samples (``calib.distributed``); the merge equals a local pass bit for bit."""
    c = ctx.cfg
    if c.preprocess or c.sampling_strategy or ctx.subset:
        raise ConfigError("compute.backend = 'ray' collects the whole calibration path with its guessed "
                          "preprocessing: drop [preprocess]/[sampling] or collect with 'calib collect "
                          "--backend ray' and reuse the statistics")
    workers = c.num_workers if not c.address else 1
    res = collect_sharded(c.model, c.calib_data, backend="ray", address=c.address or None,
                          num_workers=c.num_workers, batch_size=c.batch_size, skip_bad=c.skip_bad,
                          max_memory=resolve_max_memory(c.max_memory, workers), providers=c.providers,
                          limit=c.limit or None, progress=ctx.progress)
    return res.stats


def calibrate_step(ctx: Context) -> None:
    methods = list(ctx.cfg.methods)
    primary = ctx.cfg.primary
    if primary not in CHOOSERS and parse_method(primary).label not in [parse_method(m).label for m in methods]:
        methods.append(primary)  # a named method outside the list is calibrated too
    ctx.ranges = mark_flagged(calibrate_all(ctx.stats, methods), ctx.flagged)


def needs_selection(cfg: RunConfig) -> bool:
    """Something in the plan chooses on measured outputs (auto, best, advise, bias correction)."""
    return cfg.primary in ("auto", "best") or bool(cfg.target) or bool(cfg.transforms)


def split_step(ctx: Context) -> None:
    """Whatever chooses never reports on itself: choices are made on the selection part of the calibration
    data (split by sample id, ``calib.data.split``); figures on the evaluation data, else on the report part
    of the calibration data, labelled in-sample (the statistics saw those samples, no choice did)."""
    if not needs_selection(ctx.cfg):
        return
    sp = split_source(ctx.source, ctx.cfg.select_fraction)
    ctx.sel, ctx.split = sp.select, sp.to_json()
    if ctx.ev is None:
        ctx.ev, ctx.in_sample = sp.report, True


def choose_step(ctx: Context) -> None:
    CHOOSERS.get(ctx.cfg.primary, CHOOSERS["method"])(ctx)


def _score_candidates(ctx: Context, with_bias: bool) -> dict[str, Any]:
    """Export every method and score them in one pass (with bias correction: both versions of each)."""
    c = ctx.cfg
    ctx.candidates = {label: ctx.export(label) for label in ctx.ranges}
    corrected = {}
    if with_bias:  # every method's shifts in one pass, both versions of each scored
        corrected = correct_bias(ctx.model, ctx.candidates, ctx.source, batch_size=c.batch_size,
                                 limit=c.bias_samples or None, providers=c.providers, progress=ctx.progress)
    ctx.scored = {**ctx.candidates, **{label + BC_SUFFIX: bc.qdq for label, bc in corrected.items()}}
    ctx.scores = score_methods(ctx.model, ctx.scored, ctx.sel if ctx.sel is not None else ctx.ev,
                               batch_size=c.batch_size, metric=c.compare_metric, providers=c.providers,
                               progress=ctx.progress)
    return corrected


@register_chooser("method")
def choose_named(ctx: Context) -> None:
    """A method given by name; with evaluation data and ``all_methods`` every method is scored (report)."""
    c = ctx.cfg
    ctx.method = parse_method(c.primary).label
    if ctx.ev is not None and c.all_methods and c.compare:
        _score_candidates(ctx, with_bias=False)
    ctx.qdq = ctx.candidates.get(ctx.method) or ctx.export(ctx.method)


@register_chooser("auto")
def choose_auto_step(ctx: Context) -> None:
    """A range per activation tensor, each the candidate with the best measured effect on the outputs
    (``calib.compare.auto``), chosen on the selection samples."""
    c = ctx.cfg
    ctx.auto = choose_auto(ctx.model, ctx.stats, ctx.sel, placement=c.placement, exclude=c.exclude,
                           batch_size=c.batch_size, providers=c.providers, progress=ctx.progress,
                           time_budget=auto_seconds(ctx))
    if ctx.auto.stopped.startswith("time budget"):
        ctx.budget.cut("auto", f"search stopped in round {ctx.auto.rounds} ({ctx.auto.stopped})")
    ctx.ranges["auto"] = mark_flagged({"auto": ctx.auto.ranges}, ctx.flagged)["auto"]
    ctx.method = "auto"
    ctx.qdq = ctx.export("auto")


@register_chooser("best")
def choose_best(ctx: Context) -> None:
    """The method whose model scores best on the selection samples (``best_key``). With bias correction and
    no target each method is scored with and without it; with a target, advise re-exports from the
    ranges, so the correction is made after it instead."""
    c = ctx.cfg
    with_bias = "bias_correction" in c.transforms and not c.target
    corrected = _score_candidates(ctx, with_bias)
    ctx.best = max(ctx.scores, key=lambda k: best_key(ctx.scores[k], c.target))
    ctx.method = parse_method(ctx.best.removesuffix(BC_SUFFIX)).label
    ctx.qdq = ctx.candidates[ctx.method]
    if corrected:
        use_bc = ctx.best.endswith(BC_SUFFIX)
        ctx.bias = {**corrected[ctx.method].to_json(), "kept": use_bc,
                    "why": "scored better on the selection samples" if use_bc else
                    "the uncorrected model scored at least as well on the selection samples"}
        ctx.qdq = corrected[ctx.method].qdq if use_bc else ctx.qdq
        ctx.done.append("bias_correction")


def advise_step(ctx: Context) -> None:
    """Toward ``cfg.target``: float nodes and per-tensor methods. A missed target keeps the best model found."""
    c = ctx.cfg
    if not c.target:
        return
    order = methods_first(ctx.method, list(ctx.ranges))
    budget = advise_seconds(ctx)
    try:
        adv = advise(ctx.model, {m: ctx.ranges[m] for m in order}, ctx.sel, target=c.target, methods=order,
                     placement=c.placement, batch_size=c.batch_size,
                     metric=load_metric(c.compare_metric) if c.compare_metric else None,
                     max_steps=c.max_float_nodes or None, time_budget_s=budget,
                     sensitivity_samples=c.sensitivity_samples, progress=ctx.progress)
    except TargetNotMet as e:
        adv, ctx.missed = e.advice, e
    ctx.advice, ctx.qdq = adv, adv.qdq
    if adv.stopped.startswith("time budget"):
        ctx.budget.cut("advise", f"stopped after {len(adv.curve) - 1} step(s) ({adv.stopped})")


def transforms_step(ctx: Context) -> None:
    """Each transform in order, if its estimated cost fits what the budget leaves before verify."""
    for name in ctx.cfg.transforms:
        if name not in ctx.done:
            if ctx.budget.skip(name.replace("_", " "), transform_cost(ctx, name), verify_cost(ctx)):
                continue
            TRANSFORMS[name](ctx)
            ctx.done.append(name)


@register_transform("bias_correction")
def bias_transform(ctx: Context) -> None:
    c = ctx.cfg
    before = ctx.qdq
    qdq, ctx.bias, outs = bias_correct(
        ctx.base or ctx.model, ctx.qdq, ctx.source, ctx.sel, batch_size=c.batch_size,
        limit=c.bias_samples or None, target=c.target, metric=c.compare_metric, providers=c.providers,
        progress=ctx.progress)
    ctx.qdq = qdq
    corrected = ctx.bias.pop("_corrected", None)
    nodes = ctx.bias.pop("_nodes", [])
    held = None
    if ctx.ev is not None and corrected is not None and nodes and \
            not ctx.budget.skip("bias correction: held-out effect", heldout_cost(ctx), verify_cost(ctx)):
        held = score_pair(ctx.model, before.model, corrected.model,
                          ctx.ev, batch_size=c.batch_size, metric=c.compare_metric, providers=c.providers,
                          progress=ctx.progress, stage="bias correction: held-out effect")
    ctx.transforms.append(transform_record("bias_correction", nodes, ctx.bias["kept"], ctx.bias.get("scores"), held,
                                           target=c.target, why=ctx.bias["why"], in_sample=ctx.in_sample,
                                           paired=ctx.bias.get("paired")))
    if ctx.advice is not None:
        bias_into_advice(ctx.advice, qdq, ctx.bias, outs)
        if ctx.missed is not None and ctx.advice.met:
            ctx.missed = None


def shipping_model(ctx: Context) -> QdqModel:
    """``ctx.qdq`` with the non-INT8 remainder cast to ``cfg.high_precision`` (``calib.export.precision``):
    the model written. Cast last, after advise and transforms, which measure the FP32-remainder model. For
    the ORT target the biases are written as int32 (the fused kernels then add what the spec evaluation adds)."""
    if ctx.cfg.high_precision == "fp32":
        if ctx.cfg.placement != "ort":
            return ctx.qdq
        if ctx.ship is None or ctx.ship[0] is not ctx.qdq:  # ORT target: int32 biases (calib.export.int32_bias)
            ctx.ship = (ctx.qdq, with_int32_biases(ctx.qdq))
        return ctx.ship[1]
    if ctx.ship is None or ctx.ship[0] is not ctx.qdq:
        cast, prec = apply_high_precision(ctx.qdq, ctx.cfg.high_precision, stats=ctx.stats,
                                          keep_fp32=ctx.cfg.keep_fp32)
        ctx.precision, ctx.ship = prec.summary(), (ctx.qdq, cast)
        ctx.kept_fp32 = {"dtype": prec.dtype, "nodes": dict(prec.kept_fp32), "casts": len(prec.casts),
                         "range_ops": list(RANGE_OPS), "user_list": list(ctx.cfg.keep_fp32)}
        ctx.ort_bias = ort_bias_report(cast.model)  # what ONNX Runtime's default optimisation breaks in it
    return ctx.ship[1]


def verify_step(ctx: Context) -> None:
    """The output metrics of the model that ships and, for an fp16/bf16 remainder, of the same model with an
    FP32 remainder (``ctx.remainder``: what the cast costs), in one pass over the evaluation data."""
    c = ctx.cfg
    if ctx.ev is None or ctx.shipped:
        return
    protos = {"shipped": shipping_model(ctx).model}
    if c.high_precision != "fp32":
        protos["fp32_remainder"] = ctx.qdq.model
    outs = score_outputs(ctx.model, protos, ctx.ev, batch_size=c.batch_size,
                         metric=c.compare_metric, providers=c.providers, progress=ctx.progress,
                         stage="verifying the shipped model")
    ctx.shipped = task_metrics(outs["shipped"].result())
    if "fp32_remainder" in outs:
        ctx.remainder = task_metrics(outs["fp32_remainder"].result())


def final_ranges(ctx: Context) -> Ranges:
    """The ranges the shipped model was exported with: the chosen method's, with advise's per-tensor
    method changes (``Ranges.method`` is ``mixed`` then)."""
    base = ctx.ranges[ctx.method]
    if ctx.advice is not None and ctx.advice.changed:
        base = Ranges("mixed", {t: ctx.ranges[m].tensors[t] for t, m in ctx.advice.methods.items()},
                      base.model_sha256)
    if ctx.retuned:  # tensors whose values a kept transform changed, re-calibrated by the same method
        base = Ranges(base.method, {**base.tensors, **ctx.retuned}, base.model_sha256)
    return base


def export_shipped(ctx: Context, ranges: Ranges | None = None, base: Model | None = None,
                   weight_bits: dict[str, int] | None = None, floats: Sequence[str] = ()) -> QdqModel:
    """The shipped model exported again from its parts (FP32 base, final ranges, float nodes), with 7-bit
    weights on ``weight_bits``' nodes and ``floats`` kept float too (the deployed fix)."""
    c = ctx.cfg
    exclude = list(ctx.advice.exclude) if ctx.advice is not None else list(c.exclude)
    r = ranges if ranges is not None else final_ranges(ctx)
    if base is not None or ctx.base is not None:  # ranges of the original model, for an edited copy of it
        r = Ranges(r.method, dict(r.tensors), "")
    return export_qdq(base or ctx.base or ctx.model, r, placement=c.placement,
                      exclude=exclude + list(ctx.floats) + list(floats),
                      flagged=ctx.flagged, weight_bits=weight_bits or None)
