"""Plain-language answers for the dashboard: where the INT8 error enters, whether the evaluation data drifts
from the calibration data, and which calibration samples set the ranges.

* ``worst_layer``: the layer to open first. A comparison row may carry a *local* error (the layer
  quantized alone, on FP32 inputs: where the error enters); without one the accumulated error
  (``sqnr_db`` of the layer's output in the fully quantized model) is used, and the answer says so.
* ``drift_verdict``: one sentence and a level (``ok``/``watch``/``act``) from the clip rates, the
  Jensen-Shannon distances and the novelty scores of ``calib.drift``, with the numbers.
* ``range_setters``: per calibration sample, the largest |x| of every tensor (one FP32 pass); from it,
  which sample sets each tensor's max (the range minmax uses) and which samples are outliers
  (they set the max of a tensor by more than ``OUTLIER_RATIO`` times the runner-up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from calib.runtime import expose_outputs, make_session
from calib.data.base import batches

__all__ = ["worst_layer", "drift_verdict", "Verdict", "range_setters", "RangeSetters", "LOCAL_METRICS",
           "CLIP_WATCH", "CLIP_ACT", "NOVEL_SCORE", "OUTLIER_RATIO"]

LOCAL_METRICS = ("local_sqnr_db", "sqnr_db_local")
CLIP_WATCH, CLIP_ACT = 1e-4, 1e-2  # fraction of evaluation values past amax in the worst tensor
JS_WATCH, JS_ACT = 0.1, 0.3
NOVEL_SCORE = 3.0  # novelty score (1 = as close as calibration samples are to each other)
OUTLIER_RATIO = 1.5


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def worst_layer(layers: Sequence[Mapping[str, Any]]) -> tuple[Mapping[str, Any] | None, str]:
    """(row, why): the row with the lowest local SQNR if the rows have one, else the lowest accumulated SQNR."""
    for key, why in [(k, "local error: the layer quantized alone, where the error enters") for k in LOCAL_METRICS] + \
            [("sqnr_db", "accumulated error at the layer's output (the report has no local error)")]:
        rows = [r for r in layers if _finite(r.get(key))]
        if rows:
            row = min(rows, key=lambda r: r[key])
            return row, f"lowest {key} = {row[key]:.2f} dB; {why}"
    return None, "no layer has a finite SQNR"


@dataclass(frozen=True)
class Verdict:
    level: str  # ok | watch | act
    text: str


def drift_verdict(rows: Sequence[Mapping[str, Any]], novelty_rows: Sequence[Mapping[str, Any]], method: str
                  ) -> Verdict:
    """A sentence about calibration-vs-evaluation drift for ``method``'s ranges (rows of ``TensorDrift.to_row``)."""
    clip = [(r[f"clip_rate:{method}"], r["tensor"]) for r in rows if _finite(r.get(f"clip_rate:{method}"))]
    js = [r["js_distance"] for r in rows if _finite(r.get("js_distance"))]
    worst_clip, worst_t = max(clip) if clip else (0.0, "")
    n_clip = sum(c > CLIP_WATCH for c, _ in clip)
    med_js = float(np.median(js)) if js else 0.0
    scores = [r["score"] for r in novelty_rows if _finite(r.get("score"))]
    n_novel = sum(s > NOVEL_SCORE for s in scores)
    level = "ok"
    if worst_clip > CLIP_WATCH or med_js > JS_WATCH or n_novel:
        level = "watch"
    if worst_clip > CLIP_ACT or med_js > JS_ACT or (scores and n_novel > 0.1 * len(scores)):
        level = "act"
    head = {"ok": "The calibration set covers the evaluation data",
            "watch": "The evaluation data drifts a little from the calibration set",
            "act": "The evaluation data is not covered by the calibration set"}[level]
    parts = [f"{n_clip} of {len(clip)} tensors clip more than {CLIP_WATCH:.2%} of their evaluation values "
             f"with {method} ranges" + (f" (worst {worst_clip:.3%} at `{worst_t}`)" if clip else ""),
             f"median Jensen-Shannon distance {med_js:.3f}",
             f"{n_novel} of {len(scores)} evaluation samples are novel (score > {NOVEL_SCORE:g})"]
    advice = {"ok": "", "watch": " Consider adding the most novel samples to the calibration set.",
              "act": " Add the flagged samples to the calibration set and re-calibrate."}[level]
    return Verdict(level, f"{head}: " + "; ".join(parts) + "." + advice)


@dataclass
class RangeSetters:
    ids: list[str]
    tensors: list[str]
    max_abs: np.ndarray  # [samples, tensors] largest |x| of each tensor in each sample

    def setters(self) -> dict[str, str]:
        """tensor -> id of the sample with the largest |x| (the one that sets the minmax range)."""
        return {t: self.ids[int(k)] for t, k in zip(self.tensors, self.max_abs.argmax(0))}

    def per_sample(self) -> list[dict[str, Any]]:
        """Per sample: how many ranges it sets, and how many of those by > OUTLIER_RATIO x the runner-up."""
        n = len(self.ids)
        sets = np.zeros(n, np.int64)
        outlier = np.zeros(n, np.int64)
        if n:
            top = self.max_abs.argmax(0)
            srt = np.sort(self.max_abs, axis=0)
            second = srt[-2] if n > 1 else np.zeros(len(self.tensors))
            np.add.at(sets, top, 1)
            far = self.max_abs[top, np.arange(len(self.tensors))] > OUTLIER_RATIO * second
            np.add.at(outlier, top[far], 1)
        return [{"id": i, "ranges_set": int(s), "outlier_ranges": int(o), "outlier": bool(o)}
                for i, s, o in zip(self.ids, sets, outlier)]


def range_setters(model, source: Iterable, tensors: Sequence[str], *, batch_size: int = 8,
                  providers: Sequence[str] | None = None,
                  progress: Callable[[str, int, "int | None"], None] | None = None) -> RangeSetters:
    """One FP32 pass over ``source``: the largest |x| of each of ``tensors`` per sample (batched sources)."""
    inputs = {s.name for s in model.inputs}
    fetch = [t for t in tensors if t not in inputs]
    sess = make_session(expose_outputs(model.proto, fetch), providers)
    total = len(source) if hasattr(source, "__len__") else None
    ids, rows, done = [], [], 0
    for bids, feeds, _ in batches(source, model.inputs, batch_size, layout=getattr(source, "layout", "batch")):
        vals = dict(zip(fetch, sess.run(fetch, feeds)))
        vals.update({t: feeds[t] for t in tensors if t in inputs})
        cols = []
        for t in tensors:
            v = np.abs(np.asarray(vals[t], np.float64)).reshape(len(bids), -1)
            cols.append(np.where(np.isfinite(v), v, 0.0).max(1) if v.shape[1] else np.zeros(len(bids)))
        rows.append(np.stack(cols, 1))
        ids += list(bids)
        done += len(bids)
        if progress:
            progress("range setters", done, total)
    return RangeSetters(ids, list(tensors), np.concatenate(rows) if rows else np.zeros((0, len(tensors))))
