"""``compare``: FP32 vs Q/DQ, layer by layer and at the outputs, streamed over the evaluation data.

Both models run on ONNX Runtime (``calib.compare.layer_pass``, here or in shards on the Ray backend)
with exactly the comparable tensors marked (``calib.compare.mapping``). Each
batch is folded into ``TensorAccumulator``s and dropped, so memory does not grow
with the number of samples. The result is a ``CompareReport``: per-layer metrics
in topological order, output and task metrics, what was skipped and why, and
(optionally) a sensitivity ranking; ``to_json``/``from_json`` round-trip it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from calib.compare.evaluate import current_backend
from calib.compare.layer_pass import LayerJob, run_layer_pass
from calib.compare.local import local_model
from calib.compare.mapping import TensorMap, map_models
from calib.compare.metrics import safe_float, unsafe_float
from calib.compare.sensitivity import sensitivity as run_sensitivity
from calib.compare.targets import UserMetric
from calib.errors import CalibError, InputDataError
from calib.io import write_json
from calib.model import Model, as_model, as_qdq_model
from calib.runtime import run_batches

__all__ = ["CompareReport", "compare", "as_model", "as_qdq_model", "run_batches", "REPORT_FORMAT", "ranking_metric"]

log = logging.getLogger(__name__)

REPORT_FORMAT = "calib.compare"
REPORT_VERSION = 1
Progress = Callable[[str, int, "int | None"], None]

LAYER_KEYS = ("cosine", "cosine_global", "min_cosine", "worst_sample", "sqnr_db", "max_abs_error",
              "mean_abs_error", "relative_error", "n_values", "n_nonfinite")


@dataclass
class CompareReport:
    """Per-layer and output metrics of one FP32/INT8 pair over one evaluation set."""

    layers: list[dict[str, Any]]
    outputs: dict[str, Any]
    n_samples: int
    mapping: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    sensitivity: dict[str, Any] | None = None
    seconds: float = 0.0

    def worst(self, k: int = 10, key: str = "sqnr_db") -> list[dict[str, Any]]:
        """The ``k`` layers with the lowest ``key`` (SQNR or cosine), worst first."""
        return sorted(self.layers, key=lambda r: (r[key] if r[key] == r[key] else -np.inf))[:k]

    def to_json(self) -> dict[str, Any]:
        return safe_float({
            "format": REPORT_FORMAT, "version": REPORT_VERSION, "n_samples": self.n_samples,
            "config": self.config, "definitions": DEFINITIONS, "outputs": self.outputs, "layers": self.layers,
            "mapping": self.mapping, "sensitivity": self.sensitivity, "seconds": round(self.seconds, 3)})

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "CompareReport":
        if doc.get("format") != REPORT_FORMAT:
            raise CalibError(f"not a calib compare report (format {doc.get('format')!r})")
        d = unsafe_float(doc)
        return cls(layers=d["layers"], outputs=d["outputs"], n_samples=d["n_samples"], mapping=d.get("mapping", {}),
                   config=d.get("config", {}), sensitivity=d.get("sensitivity"), seconds=d.get("seconds", 0.0))

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_json())

    def summary(self) -> str:
        lines = [f"{len(self.layers)} layers compared over {self.n_samples} samples"]
        for o, r in self.outputs.items():
            if o.startswith("_"):
                continue
            s = f"output {o}: cosine {r['cosine']:.5f}, SQNR {r['sqnr_db']:.1f} dB"
            if "top1_agreement" in r:
                s += f", top-1 agreement {r['top1_agreement']:.4f}"
            if "accuracy_int8" in r:
                s += f", accuracy FP32 {r['accuracy_fp32']:.4f} / INT8 {r['accuracy_int8']:.4f}"
            lines.append(s)
        if "_user_metric" in self.outputs:
            u = self.outputs["_user_metric"]
            lines.append(f"metric {u['name']}: {u['value']:.6g}")
        for r in self.worst(3):
            lines.append(f"worst layer {r['node']} ({r['op_type']}, depth {r['depth']}): SQNR {r['sqnr_db']:.1f} dB, "
                         f"cosine {r['cosine']:.5f}")
        return "\n".join(lines)


def ranking_metric(layers: Sequence[dict[str, Any]]) -> str:
    """The metric that says where error enters: ``local_sqnr_db`` when any layer row has one (an older report
    or a model without Q/DQ inputs has none), else the accumulated ``sqnr_db``."""
    return "local_sqnr_db" if any(isinstance(r.get("local_sqnr_db"), (int, float)) for r in layers) else "sqnr_db"


DEFINITIONS = {
    "cosine": "mean over samples of the per-sample cosine similarity of the flattened tensors",
    "cosine_global": "cosine similarity over all values of all samples",
    "sqnr_db": "10*log10(sum fp32^2 / sum (int8-fp32)^2) over all values",
    "relative_error": "||int8-fp32||_2 / ||fp32||_2 over all values",
    "max_abs_error": "max |int8-fp32|", "mean_abs_error": "mean |int8-fp32|",
    "local_*": "the quantized node run in INT8 on FP32 inputs vs its FP32 output: where error enters "
               "(None for a node that reads no Q/DQ input)",
    "layer": "the float output of the FP32 node and of its counterpart in the Q/DQ model (before any Q/DQ "
             "on that output); fused Relu/Clip compare with the dequantized tensor",
}


def _labels_for(source, labels: Sequence[int] | None) -> Sequence[int] | None:
    if labels is None:
        return None
    if len(labels) != len(source):
        raise InputDataError(f"{len(labels)} labels for {len(source)} samples", hint="give one label per sample")
    return labels


def _layer_rows(pairs, acc, lm) -> list[dict[str, Any]]:
    """One row per paired tensor: accumulated error (FP32 vs Q/DQ) beside the local error where it enters."""
    rows = []
    for p in pairs:
        r = acc[p.fp32].result()
        rows.append({"fp32_tensor": p.fp32, "qdq_tensor": p.qdq, "node": p.node, "op_type": p.op_type,
                     "depth": p.depth, "note": p.note, **{k: r[k] for k in LAYER_KEYS}, **lm.fields(p.fp32)})
    return rows


def compare(fp32: Model | str | os.PathLike, qdq: Any, source, *, batch_size: int = 16,
            labels: Sequence[int] | None = None, metric: UserMetric | Callable | None = None,
            layers: bool = True, optimization: str = "disable", providers: Sequence[str] | None = None,
            tensor_map: TensorMap | None = None, limit: int | None = None, sensitivity: bool = False,
            sensitivity_samples: int = 128, progress: Progress | None = None) -> CompareReport:
    """Compare ``fp32`` and ``qdq`` on ``source``: per-layer metrics (``layers``) and output metrics.

    ``metric``: a user metric (see ``calib.compare.targets``). ``labels``: one
    integer per sample, overriding the source's labels. ``limit``: use only the
    first samples. ``optimization``: ONNX Runtime level (see ``calib.runtime``).
    ``sensitivity``: also rank the quantized nodes (``calib.compare.sensitivity``) on
    up to ``sensitivity_samples`` samples.
    """
    t0 = time.perf_counter()
    fm = as_model(fp32)
    tm = tensor_map or map_models(fm, as_qdq_model(qdq))
    qm = tm.qdq
    labels = _labels_for(source, labels)
    user = UserMetric.wrap(metric) if metric is not None else None
    pairs = tm.pairs if layers else []
    outs = fm.output_names
    lm = local_model(fm, tm) if pairs else None  # local error: quantized nodes on FP32 inputs (calib.compare.local)
    total = min(len(source), limit) if limit is not None else len(source)
    job = LayerJob(lm.proto if lm else fm.proto, qm.proto, tuple((p.fp32, p.qdq, p.node) for p in pairs),
                   dict(lm.pairs) if lm else {}, tuple(outs), user, batch_size, optimization,
                   tuple(providers) if providers else None)
    if progress:
        progress("compare", 0, total)
    backend = current_backend()
    if backend is not None and hasattr(backend, "layer_pass"):  # e.g. Ray: shards by sample id, merged exactly
        lp = backend.layer_pass(job, fm, source, labels=labels, limit=limit, progress=progress)
    else:
        lp = run_layer_pass(job, fm, source, labels=labels, limit=limit, progress=progress, total=total)
    acc, om, done = lp.layers, lp.outputs, lp.n
    if lm:
        lm.acc = lp.local
    if done == 0:
        raise InputDataError("the evaluation data holds no samples")
    rows = _layer_rows(pairs, acc, lm)
    cfg = {"fp32": str(fm.path) if fm.path else None, "qdq": str(qm.path) if qm.path else None,
           "fp32_sha256": fm.sha256, "batch_size": batch_size, "optimization": optimization,
           "providers": list(providers or ["cpu"]), "user_metric": user.name if user else None}
    sens = None
    if sensitivity:
        sens = run_sensitivity(fm, qm, source, batch_size=batch_size, max_samples=sensitivity_samples,
                               optimization=optimization, providers=providers, tensor_map=tm,
                               progress=progress).to_json()
    return CompareReport(layers=rows, outputs=om.result(), n_samples=done, mapping=tm.summary(), config=cfg,
                         sensitivity=sens, seconds=time.perf_counter() - t0)
