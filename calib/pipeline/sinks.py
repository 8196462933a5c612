"""Where a plan's results go: files the user named (``calib quantize``) or a run directory (``calib run``).

Both sinks receive the same artifacts from ``write_artifacts``, so the same inputs give byte-identical
files whichever entry point ran the plan. A sink answers ``path(key, name)`` with the file to write an
artifact to, or ``None`` when it does not keep that artifact.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

from calib.compare.advice import advice_json_path
from calib.compare.metrics import safe_float
from calib.config import CHOOSER_NAMES
from calib.export import QdqModel, scale_report, write_cache, write_scale_report
from calib.export.trt_cache import model_cache
from calib.data.preprocess import stamp_model
from calib.io import save_onnx, write_json
from calib.recalibrate import collect_into_run, copy_shards
from calib.pipeline.scoring import compare_model
from calib.pipeline.steps import Context, final_ranges, shipping_model
from calib.runs import Run, RunStore
from calib.stats import ActivationStats

__all__ = ["FileSink", "RunSink", "write_artifacts", "method_file_label"]


def method_file_label(label: str) -> str:
    return label.replace(":", "-")


class FileSink:
    """``calib quantize``: the model at ``output``; cache, scale report and statistics where asked."""

    method_files = ""  # no model per method
    reports = False  # no per-layer comparison

    def __init__(self, output: Path, *, cache: Path | None = None, report: Path | None = None,
                 stats_out: Path | None = None, stats: ActivationStats | None = None) -> None:
        self._paths = {"model": Path(output), "advise": advice_json_path(output), "cache": cache,
                       "scales": report, "stats": stats_out}
        self._stats = stats  # already collected on the run's data ('calib export --method auto'): no pass

    def path(self, key: str, name: str) -> Path | None:
        p = self._paths.get(key)
        return None if p is None else Path(p)

    def timing(self, stage: str):
        return contextlib.nullcontext()

    def record(self, **fields: Any) -> None:
        pass

    def reuse_stats(self) -> ActivationStats | None:
        return self._stats

    def collector(self):
        return None  # plain ``collect``

    def seal(self, key: str) -> None:
        pass


class RunSink:
    """``calib run``, the demo and the dashboard: every artifact in the run directory, listed in run.json."""

    def __init__(self, run: Run, store: RunStore, *, model_sha256: str, data_fingerprint: str, key: str,
                 method_files: str, reports: bool) -> None:
        self.run, self.store = run, store
        self._reuse = (model_sha256, data_fingerprint, key)
        self.method_files, self.reports = method_files, reports
        run.update(stats_key=key)

    def path(self, key: str, name: str) -> Path:
        return self.run.add_artifact(key, name)

    def timing(self, stage: str) -> contextlib.AbstractContextManager:
        return self.run.timing(stage)

    def record(self, **fields: Any) -> None:
        self.run.update(**fields)

    def reuse_stats(self) -> ActivationStats | None:
        """Statistics of an earlier complete run on the same model, data and options, copied into this run."""
        reused = self.store.find_stats(*self._reuse)
        if self.store.skipped:
            self.run.update(stats_not_reused=self.store.skipped)
        if reused is None:
            return None
        stats_path = self.path("stats", "stats.npz")
        self.store.copy_verified(reused, stats_path)
        self.run.update(stats_reused_from=str(reused.parent.name))
        copy_shards(self.store.get(reused.parent), self.run)  # so re-calibrating this run re-collects little
        stats = ActivationStats.load(stats_path)
        self.seal("stats")
        return stats

    def collector(self):
        """Collect shard by shard into the run (``calib.recalibrate``: re-calibration re-collects only the
        shards whose samples changed); the merged total equals one pass bit for bit."""
        return functools.partial(collect_into_run, self.run)

    def seal(self, key: str) -> None:
        """Record the artifact's sha256 so a later run reuses it only if it is unchanged."""
        self.run.seal(key)


def _write_method_files(ctx: Context, sink) -> None:
    """Each method's (``method_files = "all"``) or the chosen method's (``"chosen"``) Q/DQ model and, with
    evaluation data, its per-layer comparison (the dashboard's Layers page, ``calib diff``)."""
    c = ctx.cfg
    for label in (list(ctx.ranges) if sink.method_files == "all" else [ctx.method]):
        fl = method_file_label(label)
        with sink.timing(f"export:{label}"):
            q = ctx.candidates.get(label) or ctx.export(label)
            q.save(sink.path(f"qdq:{label}", f"model.{fl}.int8.onnx"))
        if ctx.ev is not None and c.compare:
            with sink.timing(f"compare:{label}"):
                compare_model(ctx.model, q.model, ctx.ev, batch_size=c.batch_size, metric=c.compare_metric,
                              stats=ctx.stats, methods=_named(ctx.ranges), progress=ctx.progress,
                              html=sink.path(f"report:{label}", f"report.{fl}.html") if c.html else None,
                              json_path=sink.path(f"compare:{label}", f"compare.{fl}.json"))


def _write_report(ctx: Context, sink, shipped: QdqModel) -> None:
    """report.html and compare.json describe the model that ships (its fp16/bf16 remainder included)."""
    c = ctx.cfg
    if not (sink.reports and ctx.ev is not None and c.compare):
        return
    with sink.timing("compare:shipped"):
        # against the FP32 model it was exported from: a kept transform rescaled some channels in between
        compare_model(ctx.base or ctx.model, shipped.model, ctx.ev, batch_size=c.batch_size, metric=c.compare_metric,
                      stats=ctx.stats, methods=_named(ctx.ranges), progress=ctx.progress,
                      html=sink.path("report", "report.html") if c.html else None,
                      json_path=sink.path("compare", "compare.json"),
                      advice=ctx.advice.to_json() if ctx.advice is not None else None,
                      title=f"calib: the shipped model ({shipped_path(ctx)})")


def shipped_path(ctx: Context) -> str:
    """How the shipped model was made, in words: method, transforms, float nodes."""
    final = final_ranges(ctx)
    parts = [ctx.method + (f" ({len(ctx.advice.changed)} tensors changed method)" if final.method == "mixed"
                           else "")]
    parts += [t["name"] for t in ctx.transforms if t["kept"] and t["name"] != "bias_correction"]
    parts += [t.replace("_", " ") + ("" if (ctx.bias or {}).get("kept", True) else " (not kept)")
              for t in ctx.done]
    if ctx.deployed and (ctx.deployed.get("weight_bits") or ctx.deployed.get("float_nodes")):
        parts.append(f"deployed fix: 7-bit weights on {len(ctx.deployed['weight_bits'])} node(s)")
    if ctx.advice is not None:
        parts.append(f"advise: {len(ctx.advice.exclude)} float node(s)")
    return " + ".join(parts)


def ship_model(ctx: Context) -> QdqModel:
    """The model as written (``shipping_model``: the fp16/bf16 remainder cast), with the preprocessing
    spec in its metadata."""
    shipped = shipping_model(ctx)
    for q in {id(ctx.qdq): ctx.qdq, id(shipped): shipped}.values():
        stamp_model(q.model, getattr(ctx.source, "spec", None))  # the spec travels with the model
    return shipped


def write_artifacts(ctx: Context, sink) -> None:
    """Every artifact of the plan; the cache and scale report from the ranges the shipped model was
    exported with (after advise's per-tensor changes, without float and skipped tensors)."""
    c = ctx.cfg
    if sink.method_files:
        _write_method_files(ctx, sink)
    if ctx.bias is not None and (p := sink.path("bias", "bias.json")) is not None:
        write_json(p, safe_float(ctx.bias))
    if ctx.advice is not None:
        write_json(sink.path("advise", "advise.json"), ctx.advice.to_json())
    shipped = ship_model(ctx)
    save_onnx(shipped.model, sink.path("model", "model.int8.onnx"))
    final = final_ranges(ctx)
    if c.cache and (p := sink.path("cache", "model.cache")) is not None:
        write_cache(p, model_cache(shipped, (ctx.base or ctx.model).proto, final), version=c.trt_version, scales=True)
    if (p := sink.path("scales", "scales.json")) is not None:
        doc = scale_report(ctx.qdq, {**ctx.ranges, final.method: final}, chosen=final.method, stats=ctx.stats)
        doc.update(transforms=safe_float(ctx.transforms), deployed=safe_float(ctx.deployed))
        if ctx.kept_fp32:  # the written model's FP32 nodes and why (its keep-FP32 list, calib.export.precision)
            doc["high_precision"] = ctx.kept_fp32
        if ctx.ort_bias:  # Conv/Gemm biases ONNX Runtime's default optimisation overflows (calib.export.ort_bias)
            doc["onnxruntime_fp16_bias"] = ctx.ort_bias
        write_scale_report(p, ctx.auto.annotate_scales(doc) if ctx.auto is not None else doc)
    if ctx.auto is not None and (p := sink.path("auto", "auto.json")) is not None:
        write_json(p, ctx.auto.to_json())  # per tensor: chosen candidate, runner-up, margin, scores
    _write_report(ctx, sink, shipped)


def _named(ranges: dict) -> list[str]:
    """The named calibration methods among the run's ranges (the report plots their thresholds; ``auto``'s
    per-tensor mix has no single threshold rule)."""
    return [m for m in ranges if m not in CHOOSER_NAMES]
