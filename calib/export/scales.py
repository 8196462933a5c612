"""Scale report: one JSON document with every scale an export used, and why.

Per quantized activation tensor: the chosen method, the amax and scale
exported (after Concat sharing), the calibrated amax before sharing, the
sample count and non-finite count from the statistics, the rules that placed
the Q/DQ, and every other method's amax beside it. Per int8 weight: the nodes
reading it, the axis, and min/median/max channel scale with the number of
all-zero channels. Skipped tensors and excluded nodes are listed with reasons.

The scale and amax of each activation are read from the written model (its
QuantizeLinear), so the report describes the file on disk even after advise
or a precision cast; ``methods`` gives each tensor's true method label when
advise mixed methods per tensor.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from calib.calibrate.base import INT8_MAX, Ranges
from calib.errors import RangesError
from calib.export.qdq import QdqModel
from calib.export.trt_cache import qdq_activation_scales
from calib.io import write_json

__all__ = ["REPORT_FORMAT", "scale_report", "write_scale_report"]

REPORT_FORMAT = "calib-scales/1"


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _counts(stats: Any, tensor: str) -> tuple[int | None, int | None]:
    if stats is None:
        return None, None
    h = getattr(stats, "tensors", {}).get(tensor)
    if h is None:
        return None, None
    return int(getattr(h, "n", 0)), int(getattr(h, "n_nonfinite", 0))


def scale_report(qdq: QdqModel, ranges: Mapping[str, Ranges], *, chosen: str | None = None,
                 stats: Any = None, methods: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Build the report. ``ranges`` maps method name -> Ranges (the chosen one included);
    ``stats`` (an ActivationStats, optional) supplies sample and non-finite counts; ``methods``
    (tensor -> method label, optional) overrides the label of tensors whose method advise changed."""
    if not ranges:
        raise RangesError("scale report: no ranges given")
    if chosen is None:
        if len(ranges) != 1:
            raise RangesError(f"scale report: say which of {', '.join(ranges)} was exported (chosen=...)")
        chosen = next(iter(ranges))
    if chosen not in ranges:
        raise RangesError(f"scale report: chosen method '{chosen}' is not among {', '.join(ranges)}")
    main = ranges[chosen]
    shared_of = {t: [m for m in group if m != t] for group in qdq.shared for t in group}
    written = qdq_activation_scales(qdq.model)
    methods = dict(methods or {})
    activations = []
    for t in qdq.activation_tensors:
        r = main.tensors.get(t)
        amax = qdq.amax.get(t, r.amax if r else float("nan"))
        scale = written.get(t, float(np.float32(amax / INT8_MAX)))
        n, n_nonfinite = _counts(stats, t)
        activations.append({
            "tensor": t,
            "method": methods.get(t) or (r.method if r else chosen),
            "amax": _finite(amax),
            "scale": _finite(scale),
            "calibrated_amax": _finite(r.amax) if r else None,
            "degenerate": r.degenerate if r else None,
            "shared_with": shared_of.get(t, []),
            "rules": qdq.rules.get(t, []),
            "n": n,
            "n_nonfinite": n_nonfinite,
            "other_amax": {m: _finite(rr.tensors[t].amax) for m, rr in ranges.items()
                           if m != chosen and t in rr.tensors},
        })
    weights = [_weight_row(w) for w in qdq.weights]
    skipped = []
    for t, reason in qdq.skipped.items():
        n, n_nonfinite = _counts(stats, t)
        r = main.tensors.get(t)
        skipped.append({"tensor": t, "reason": reason, "amax": _finite(r.amax) if r else None,
                        "n": n, "n_nonfinite": n_nonfinite})
    return {
        "format": REPORT_FORMAT,
        "placement": qdq.placement,
        "chosen_method": chosen,
        "methods": list(ranges),
        "model_sha256": getattr(main, "model_sha256", ""),
        "activations": activations,
        "weights": weights,
        "skipped": skipped,
        "excluded_nodes": list(qdq.excluded),
        "folded_batchnorm": list(qdq.folded),
    }


def _weight_row(w) -> dict[str, Any]:
    s = np.asarray(w.scales, dtype=np.float64)
    return {
        "initializer": w.initializer,
        "int8_initializer": w.int8_name,
        "nodes": list(w.nodes),
        "axis": w.axis,
        "channels": int(s.size),
        "scale_min": float(s.min()),
        "scale_median": float(np.median(s)),
        "scale_max": float(s.max()),
        "zero_channels": int(w.zero_channels),
    }


def write_scale_report(path: str | os.PathLike, report: dict[str, Any]) -> Path:
    """Write the report as JSON, atomically."""
    return write_json(path, report)
