"""Cache migration for TensorRT 11: a calibration cache -> a Q/DQ model with those scales.

TensorRT 11 dropped implicit INT8 and calibrators, so a TensorRT <= 10 cache
(or ONNX Runtime's calibration table, see ``read_any_cache``) is only usable
once its scales are placed in the ONNX as Q/DQ. ``import_cache`` does that
with calib's placement rules: the cache's scale becomes the tensor's range
(amax = scale * 127, exact in float32), tensors the placement would quantize
but the cache lacks stay float (listed), cache entries naming no tensor of
the model are listed (TensorRT names fused or ``(Unnamed Layer* N)``
tensors that have no ONNX counterpart). ``cache_vs_stats`` compares the
cache's ranges with fresh statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from calib.calibrate.base import Ranges
from calib.errors import RangesError
from calib.export.qdq import QdqModel, export_qdq
from calib.model import Model

__all__ = ["CacheImport", "import_cache", "cache_vs_stats"]

LACKS = "the calibration cache has no scale for it"


@dataclass
class CacheImport:
    qdq: QdqModel
    cache_lacks: list[str] = field(default_factory=list)  # tensors the placement wanted, not in the cache
    model_lacks: list[str] = field(default_factory=list)  # cache entries naming no tensor of the model

    def to_json(self) -> dict[str, Any]:
        return {"quantized": self.qdq.activation_tensors, "cache_lacks": self.cache_lacks,
                "model_lacks": self.model_lacks, "excluded_nodes": self.qdq.excluded}


def _activations(model: Model) -> list[str]:
    g = model.graph
    inits = set(model.initializers)
    return [i.name for i in g.input if i.name not in inits] + [o for n in g.node for o in n.output if o]


def import_cache(model: Model, cache: Ranges, *, placement: str = "trt", exclude: Iterable[str] = (),
                 weights: str = "per_channel") -> CacheImport:
    """Q/DQ model of ``model`` whose activation scales are the cache's, placed by ``placement``."""
    known = _activations(model)
    known_set = set(known)
    model_lacks = [t for t in cache if t not in known_set]
    kept = {t: r for t, r in cache.tensors.items() if t in known_set}
    if not kept:
        raise RangesError(f"none of the {len(cache)} tensors in the cache exists in the model "
                          f"(e.g. {next(iter(cache), '?')!r})", hint="the cache was written for another model")
    ranges = Ranges(method=cache.method, tensors=kept)
    flagged = {t: LACKS for t in known if t not in kept}
    qdq = export_qdq(model, ranges, weights=weights, placement=placement, exclude=exclude, flagged=flagged)
    lacks = [t for t, why in qdq.skipped.items() if LACKS in why]
    return CacheImport(qdq, cache_lacks=lacks, model_lacks=model_lacks)


def _clipped_fraction(h: Any, amax: float) -> float:
    """Share of finite values with |x| in a histogram bin lying wholly above ``amax`` (a lower bound)."""
    if not h.n_finite:
        return 0.0
    lower = np.arange(len(h.pos)) * h.bin_width
    above = lower >= amax
    return float((h.pos[above].sum() + h.neg[above].sum()) / h.n_finite)


def cache_vs_stats(cache: Ranges, stats: Any) -> list[dict[str, Any]]:
    """Per tensor in both: the cache's amax against the statistics' max |x|.

    ``verdict``: "clips" when the cache's amax is below max |x| (``clipped``:
    share of values beyond it, from the histogram, a lower bound), "wastes"
    when it is more than twice max |x| (``wasted_bits`` = log2(amax / max|x|)
    of the 8 bits go unused), else "ok". Sorted worst first.
    """
    rows = []
    for t, r in cache.tensors.items():
        h = stats.tensors.get(t)
        if h is None or not h.n_finite:
            continue
        mx = float(h.max_abs)
        ratio = r.amax / mx if mx > 0 else math.inf
        clipped = _clipped_fraction(h, r.amax) if r.amax < mx else 0.0
        verdict = "clips" if r.amax < mx else ("wastes" if ratio > 2 else "ok")
        rows.append({"tensor": t, "cache_amax": r.amax, "max_abs": mx, "ratio": ratio, "verdict": verdict,
                     "clipped": clipped, "wasted_bits": math.log2(ratio) if verdict == "wastes" else 0.0})
    order = {"clips": 0, "wastes": 1, "ok": 2}
    rows.sort(key=lambda d: (order[d["verdict"]], -d["clipped"], -d["wasted_bits"]))
    return rows
