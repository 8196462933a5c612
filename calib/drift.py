"""Drift between calibration and evaluation data, and one layer's FP32-vs-INT8 values.

Three questions the dashboard asks of a run, answered from plain data:

* **Clip rate** (``clip_rate``): the fraction of an evaluation tensor's finite values
  with |x| > amax, the calibrated range. Evaluation values past amax saturate at
  INT8's end point, so a high clip rate means the calibration set did not cover what
  the model sees later.
* **Distribution distance** (``js_distance``): the Jensen-Shannon distance (base 2,
  in [0, 1]) between the calibration and evaluation histograms of one tensor. Both
  ``TensorHistogram``s live on power-of-two grids anchored at 0, so the finer one is
  re-binned to the coarser width exactly as ``TensorHistogram.merge`` does
  (``calib._kernels.downsample``), both are coarsened further to at most ``JS_BINS``
  occupied bins per sign (so that sampling noise in thousands of near-empty fine bins
  does not dominate), and the signed histograms (negative bins mirrored in front of the
  positive ones) are compared bin for bin.
* **Samples least like the calibration set** (``novelty``): per-sample features
  (``embed``: one activation of the FP32 model, mean-pooled over spatial axes) are
  standardised with the calibration set's mean and spread; an evaluation sample's
  score is its distance to the nearest calibration sample divided by the median
  nearest-neighbour distance within the calibration set (leave-one-out). A score of 1
  is "as close as calibration samples are to each other"; large scores are novel.

``layer_values`` runs the FP32 and the Q/DQ model on a few samples and returns the
values of one tensor pair (for an error histogram or a scatter), subsampled to a
fixed number of points with a seeded generator.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from calib._kernels import downsample
from calib.data.base import batches
from calib.errors import InputDataError, RangesError
from calib.runtime import expose_outputs, make_session, open_runner, run_batches
from calib.stats import ActivationStats, TensorHistogram

__all__ = ["rebin", "signed_counts", "histogram_view", "common_exp", "JS_BINS", "js_distance", "clip_rate", "TensorDrift", "tensor_drift",
           "Embedding", "feature_tensor", "embed", "Novelty", "novelty", "LayerValues", "layer_values", "worst_layers", "range_rows", "layer_deltas"]

log = logging.getLogger(__name__)
Progress = Callable[[str, int, "int | None"], None]


# ---- histograms ------------------------------------------------------------------


def rebin(h: TensorHistogram, exp: int) -> tuple[np.ndarray, np.ndarray]:
    """``(pos, neg)`` counts of ``h`` at bin width ``2**exp`` (``exp >= h.exp``), as ``merge`` re-bins."""
    if exp < h.exp:
        raise RangesError(f"cannot re-bin a histogram of width 2**{h.exp} to the finer width 2**{exp}")
    p, q = h.pos.copy(), h.neg.copy()
    if exp > h.exp:
        downsample(p, exp - h.exp)
        downsample(q, exp - h.exp)
    return p, q


def signed_counts(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """One histogram over the signed axis: negative bins (far to near 0) then positive bins."""
    return np.concatenate([neg[::-1], pos])


def _js(p: np.ndarray, q: np.ndarray) -> float:
    p = p.astype(np.float64)
    q = q.astype(np.float64)
    if p.sum() == 0 or q.sum() == 0:
        return math.nan
    p /= p.sum()
    q /= q.sum()
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum()
        kl_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum()
    return float(math.sqrt(max(0.0, 0.5 * (kl_p + kl_q))))


JS_BINS = 64


def common_exp(a: TensorHistogram, b: TensorHistogram, *, bins: int = JS_BINS) -> int:
    """The width exponent both histograms are compared at: the coarser of the two, coarsened further (by
    powers of two) until the larger max|x| spans at most ``bins`` bins on each side of 0."""
    e = max(a.exp, b.exp)
    span = max(a.max_abs, b.max_abs)
    if span > 0:
        occupied = math.floor(span / math.ldexp(1.0, e)) + 1
        if occupied > bins:
            e += int(math.ceil(math.log2(occupied / bins)))
    return e


def js_distance(a: TensorHistogram, b: TensorHistogram, *, bins: int = JS_BINS) -> float:
    """Jensen-Shannon distance (base 2, 0 = same distribution, 1 = disjoint) of two histograms of one tensor.

    Compared at ``common_exp``: with 2048 fine bins per side, the sampling noise of a
    few thousand values would dominate the distance, so both are re-binned (exactly,
    as ``merge`` does) to at most ``bins`` occupied bins per sign. NaN when either
    histogram holds no finite value.
    """
    e = common_exp(a, b, bins=bins)
    pa, na = rebin(a, e)
    pb, nb = rebin(b, e)
    return _js(signed_counts(pa, na), signed_counts(pb, nb))


def histogram_view(h: TensorHistogram, *, max_bins: int = 160) -> tuple[np.ndarray, np.ndarray, float]:
    """A signed histogram of ``h`` for plotting: ``(bin centres, counts, bin width)``.

    Bins are merged in powers of two (as ``merge`` does) until the occupied range fits in
    ``max_bins`` bins, and only bins from the lowest to the highest occupied one are returned.
    """
    if h.n_finite == 0:
        return np.zeros(0), np.zeros(0, np.int64), h.bin_width
    occupied = int(math.ceil(h.max_abs / h.bin_width)) + 1
    times = max(0, int(math.ceil(math.log2(max(1.0, 2 * occupied / max_bins)))))
    p, q = rebin(h, h.exp + times)
    w = math.ldexp(1.0, h.exp + times)
    counts = signed_counts(p, q)
    n = p.shape[0]
    centres = (np.arange(-n, n, dtype=np.float64) + 0.5) * w
    nz = np.flatnonzero(counts)
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    return centres[lo:hi], counts[lo:hi], w


def clip_rate(h: TensorHistogram, amax: float) -> float:
    """Fraction of the finite values of ``h`` with |x| > ``amax`` (at bin resolution, see ``clipped_fraction``)."""
    return h.clipped_fraction(amax)


@dataclass(frozen=True)
class TensorDrift:
    """Calibration-vs-evaluation drift of one tensor."""

    tensor: str
    depth: int | None
    js_distance: float
    clip_rate: dict[str, float]  # method -> fraction of eval values past that method's amax
    amax: dict[str, float]  # method -> amax
    calib_max_abs: float
    eval_max_abs: float
    n_calib: int
    n_eval: int

    def to_row(self) -> dict[str, Any]:
        row = {"tensor": self.tensor, "depth": self.depth, "js_distance": self.js_distance,
               "calib_max_abs": self.calib_max_abs, "eval_max_abs": self.eval_max_abs}
        for m, v in self.clip_rate.items():
            row[f"clip_rate:{m}"] = v
        return row


def tensor_drift(calib: ActivationStats, evaluation: ActivationStats, ranges: Mapping[str, Any], *,
                 depth: Mapping[str, int] | None = None) -> list[TensorDrift]:
    """Drift of every tensor both statistics hold, in the calibration statistics' order.

    ``ranges``: method -> ``Ranges`` (or any mapping tensor -> object with ``amax``).
    The two statistics must come from the same model.
    """
    if calib.model_sha256 and evaluation.model_sha256 and calib.model_sha256 != evaluation.model_sha256:
        raise RangesError("calibration and evaluation statistics come from different models "
                          f"(sha256 {calib.model_sha256[:12]}… vs {evaluation.model_sha256[:12]}…)",
                          hint="collect the evaluation statistics on the run's model")
    out = []
    for name, hc in calib.tensors.items():
        he = evaluation.tensors.get(name)
        if he is None:
            continue
        amax = {m: float(r[name].amax) for m, r in ranges.items() if name in r}
        out.append(TensorDrift(
            tensor=name, depth=None if depth is None else depth.get(name), js_distance=js_distance(hc, he),
            clip_rate={m: clip_rate(he, a) for m, a in amax.items()}, amax=amax,
            calib_max_abs=hc.max_abs, eval_max_abs=he.max_abs, n_calib=hc.n_finite, n_eval=he.n_finite))
    if not out:
        raise RangesError("the calibration and evaluation statistics share no tensor")
    return out


# ---- per-sample features ---------------------------------------------------------------


@dataclass
class Embedding:
    """One feature vector per sample (rows follow ``ids``)."""

    ids: list[str]
    features: np.ndarray  # float64 (n_samples, n_features)
    tensor: str
    labels: list[int | None] = field(default_factory=list)


def feature_tensor(model) -> str:
    """The tensor ``embed`` uses by default: the deepest float activation that is not a model output
    and has a batch axis (rank >= 2), preferring one with at most 4096 values per sample after pooling."""
    shapes = model.tensor_shapes
    outputs = set(model.output_names)
    depth = model.tensor_depth
    cands = []
    for t in model.activation_tensors():
        shp = shapes.get(t)
        if t in outputs or shp is None or len(shp) < 2 or not model.is_float(t):
            continue
        width = shp[1]
        small = width is not None and width <= 4096
        cands.append((small, depth.get(t, -1), t))
    if not cands:
        raise InputDataError("the model has no float activation with a batch axis to take features from",
                             hint="pass the feature tensor explicitly")
    return max(cands)[2]


def _pool(x: np.ndarray) -> np.ndarray:
    """(N, C, ...) -> (N, C) by the mean over the trailing axes; (N, C) unchanged."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim > 2:
        x = x.reshape(x.shape[0], x.shape[1], -1).mean(axis=2)
    return x


def embed(model, source: Iterable, *, tensor: str | None = None, batch_size: int = 8,
          providers: Sequence[str] | None = None, progress: Progress | None = None) -> Embedding:
    """Features of every sample of ``source``: ``tensor`` of the FP32 model, mean-pooled over spatial axes."""
    tensor = tensor or feature_tensor(model)
    layout = getattr(source, "layout", "batch")
    if layout != "batch":
        raise InputDataError("sample features need a source with a batch axis (layout 'batch')")
    sess = make_session(expose_outputs(model.proto, [tensor]), providers)
    ids: list[str] = []
    labels: list[int | None] = []
    rows: list[np.ndarray] = []
    total = len(source) if hasattr(source, "__len__") else None
    if progress:
        progress("features", 0, total)
    for bids, feeds, blabels in batches(source, model.inputs, batch_size, layout=layout):
        (x,) = sess.run([tensor], feeds)
        rows.append(_pool(x))
        ids += bids
        labels += blabels
        if progress:
            progress("features", len(ids), total)
    if not ids:
        raise InputDataError("no samples to take features from")
    return Embedding(ids, np.concatenate(rows), tensor, labels)


@dataclass
class Novelty:
    """Evaluation samples scored by how unlike the calibration set they are, most novel first."""

    ids: list[str]
    score: np.ndarray  # nearest-calibration distance / median calibration nearest-neighbour distance
    distance: np.ndarray  # standardised distance to the nearest calibration sample
    nearest: list[str]  # id of that calibration sample
    labels: list[int | None]
    scale: float  # the median calibration nearest-neighbour distance

    def rows(self) -> list[dict[str, Any]]:
        return [{"id": i, "score": float(s), "distance": float(d), "nearest_calib": n, "label": lab}
                for i, s, d, n, lab in zip(self.ids, self.score, self.distance, self.nearest, self.labels)]


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def novelty(calib: Embedding, evaluation: Embedding) -> Novelty:
    """Score every evaluation sample against the calibration set (see the module doc)."""
    if calib.features.shape[1] != evaluation.features.shape[1]:
        raise InputDataError(f"features differ in width: calibration {calib.features.shape[1]}, "
                             f"evaluation {evaluation.features.shape[1]}", hint="embed both with the same tensor")
    if len(calib.ids) < 2:
        raise InputDataError("need at least 2 calibration samples to score novelty")
    mu = calib.features.mean(0)
    sd = calib.features.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    c = (calib.features - mu) / sd
    e = (evaluation.features - mu) / sd
    dce = np.sqrt(_sq_dists(e, c))
    j = dce.argmin(1)
    dist = dce[np.arange(len(e)), j]
    dcc = np.sqrt(_sq_dists(c, c))
    np.fill_diagonal(dcc, np.inf)
    scale = float(np.median(dcc.min(1)))
    score = dist / scale if scale > 0 else np.where(dist > 0, np.inf, 0.0)
    order = np.argsort(-score, kind="stable")
    labels = evaluation.labels or [None] * len(evaluation.ids)
    return Novelty([evaluation.ids[k] for k in order], score[order], dist[order],
                   [calib.ids[j[k]] for k in order], [labels[k] for k in order], scale)


# ---- one layer, FP32 vs INT8 -----------------------------------------------------------


@dataclass
class LayerValues:
    """Paired values of one tensor in the FP32 and the Q/DQ model over a few samples."""

    fp32_tensor: str
    qdq_tensor: str
    fp32: np.ndarray  # float64, subsampled
    int8: np.ndarray
    n_samples: int
    n_values: int  # before subsampling

    @property
    def error(self) -> np.ndarray:
        return self.int8 - self.fp32


def layer_values(fp32_model, qdq_proto, source: Iterable, fp32_tensor: str, qdq_tensor: str, *,
                 n_samples: int = 4, max_points: int = 20000, seed: int = 0,
                 providers: Sequence[str] | None = None) -> LayerValues:
    """Run both models on the first ``n_samples`` samples and pair the values of one tensor."""
    fa_all, qa_all = [], []
    seen = 0
    with open_runner(fp32_model.proto, [fp32_tensor], providers=providers, name="FP32 model") as rf, \
            open_runner(qdq_proto, [qdq_tensor], providers=providers, name="Q/DQ model") as rq:
        for ids, _labs, (fa, qa) in run_batches(source, fp32_model, n_samples, [rf, rq], None, n_samples):
            a = np.asarray(fa[fp32_tensor], np.float64).ravel()
            b = np.asarray(qa[qdq_tensor], np.float64).ravel()
            if a.shape != b.shape:
                raise InputDataError(f"tensor '{fp32_tensor}' has {a.size} values in FP32 but '{qdq_tensor}' "
                                     f"has {b.size} in the Q/DQ model")
            fa_all.append(a)
            qa_all.append(b)
            seen += len(ids) if ids is not None else 1
    if not fa_all:
        raise InputDataError("the evaluation data holds no samples")
    a = np.concatenate(fa_all)
    b = np.concatenate(qa_all)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    n = a.size
    if n > max_points:
        pick = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
        a, b = a[pick], b[pick]
    return LayerValues(fp32_tensor, qdq_tensor, a, b, seen, n)


# ---- tables the dashboard shows -----------------------------------------------------------

LOWER_IS_WORSE = {"cosine": True, "cosine_global": True, "min_cosine": True, "sqnr_db": True,
                  "relative_error": False, "max_abs_error": False, "mean_abs_error": False,
                  "local_sqnr_db": True, "local_cosine": True, "local_relative_error": False}


def worst_layers(layers: Sequence[Mapping[str, Any]], metric: str = "sqnr_db", k: int = 5) -> list[Mapping[str, Any]]:
    """The ``k`` layers with the worst ``metric`` (lowest cosine/SQNR, highest errors); NaN rows last."""
    low_bad = LOWER_IS_WORSE.get(metric, True)

    def key(r: Mapping[str, Any]) -> float:
        v = r.get(metric)
        if not isinstance(v, (int, float)) or math.isnan(v):
            return math.inf
        return float(v) if low_bad else -float(v)

    return sorted(layers, key=key)[:k]


def range_rows(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per tensor of either ranges (``Ranges`` or tensor -> object with ``amax``): amax of each
    their ratio b / a and ``change`` = |b / a - 1| (NaN when a tensor is in one only or a's amax is 0)."""
    rows = []
    for t in list(dict.fromkeys([*a.keys(), *b.keys()])):
        xa = float(a[t].amax) if t in a else math.nan
        xb = float(b[t].amax) if t in b else math.nan
        ratio = xb / xa if (xa == xa and xb == xb and xa != 0) else math.nan
        rows.append({"tensor": t, "amax_a": xa, "amax_b": xb, "ratio_b_a": ratio, "change": abs(ratio - 1.0)})
    return rows


def layer_deltas(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]], metric: str = "sqnr_db"
                 ) -> list[dict[str, Any]]:
    """Per-layer change of ``metric`` from compare rows ``a`` to ``b`` (paired by FP32 tensor, a's order):
    ``delta = b - a``; layers in only one of them, or with a non-finite value, are left out."""
    rb = {r["fp32_tensor"]: r for r in b}
    out = []
    for r in a:
        s = rb.get(r["fp32_tensor"])
        if s is None:
            continue
        va, vb = r.get(metric), s.get(metric)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (va, vb)):
            continue
        out.append({"fp32_tensor": r["fp32_tensor"], "node": r["node"], "op_type": r["op_type"],
                    "depth": r["depth"], "a": float(va), "b": float(vb), "delta": float(vb) - float(va)})
    return out
