"""How well a calibration subset covers its pool (above export: it calibrates, exports and runs INT8 models).

* **Ranges**: per tensor, the subset's calibrated amax over the pool's (same method), and the
  fraction of the pool's activations that the subset's amax clips (read off the pool's
  histogram, so no activation is stored).
* **Feature space**: the k-center radius of the subset (largest distance from a pool sample to
  its nearest subset sample), beside the radius of random subsets of the same size.
* **Class balance**: label counts of pool and subset.
* **Agreement curve**: for growing subset sizes, calibrate on that many samples, export Q/DQ,
  run the INT8 model on ONNX Runtime over the evaluation set and count how often its top-1
  output equals the FP32 model's (plus the mean cosine of the outputs). Where the curve levels
  off is how many calibration samples are enough.

Nested strategies (random, kcenter) grow one ordering, so statistics of size k are the exact
merge of size k/2 and the new samples: one pass over the largest subset. All INT8 models run
side by side in a single pass over the evaluation data.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np

from calib.calibrate import calibrate
from calib.collect import collect
from calib.data.base import batches
from calib.data.sampling import pool_ids, pool_labels, radius, reduce_features, select, take
from calib.errors import InputDataError
from calib.export import export_qdq
from calib.io import write_text
from calib.runtime import make_session
from calib.subset import model_features

__all__ = ["range_coverage", "agreement_curve", "coverage", "default_sizes", "figures", "COVERAGE_FORMAT_VERSION"]

log = logging.getLogger(__name__)
Progress = Callable[[str, int, "int | None"], None]
COVERAGE_FORMAT_VERSION = 1
NESTED = ("random", "kcenter")


def range_coverage(pool_stats, subset_stats, method: str = "entropy") -> list[dict]:
    """Per tensor: pool amax, subset amax, their ratio, and the pool fraction the subset's amax clips."""

    rp = calibrate(pool_stats, method)
    rs = calibrate(subset_stats, method, tensors=list(rp))
    rows = []
    for t in rp:
        hp = pool_stats[t]
        a_pool, a_sub = float(rp[t].amax), float(rs[t].amax)
        rows.append({"tensor": t, "amax_pool": a_pool, "amax_subset": a_sub,
                     "ratio": a_sub / a_pool if a_pool > 0 else float("nan"),
                     "clipped_pool_fraction": hp.clipped_fraction(a_sub),
                     "clipped_by_pool_range": hp.clipped_fraction(a_pool)})
    return rows


def default_sizes(pool: int, largest: int | None = None) -> list[int]:
    """Powers of two from 4 up to ``largest`` (default: the pool), plus ``largest`` itself."""
    top = min(pool, largest or pool)
    sizes = [s for s in (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if s < top]
    return sizes + [top]


def _stats_for_sizes(model, pool, orderings: dict[int, np.ndarray], nested: bool, batch_size: int,
                     progress: Progress | None):
    out = {}
    if nested:
        order = orderings[max(orderings)]
        prev, acc = 0, None
        for k in sorted(orderings):
            part = collect(model, take(pool, order[prev:k]), batch_size=batch_size)
            acc = part if acc is None else acc.merge(part)
            out[k], prev = acc, k
            if progress:
                progress("collect subsets", k, max(orderings))
        return out
    for k in sorted(orderings):
        out[k] = collect(model, take(pool, orderings[k]), batch_size=batch_size)
        if progress:
            progress("collect subsets", k, max(orderings))
    return out


def agreement_curve(model, pool, eval_source, sizes: Sequence[int], *, strategy: str = "random", seed: int = 0,
                    features: np.ndarray | None = None, method: str = "entropy", placement: str = "trt",
                    pool_stats=None, batch_size: int = 16, progress: Progress | None = None) -> list[dict]:
    """INT8-vs-FP32 top-1 agreement and output cosine on ``eval_source`` for each calibration size."""
    sizes = sorted({int(s) for s in sizes})
    if not sizes or sizes[0] < 1 or sizes[-1] > len(pool):
        raise InputDataError(f"subset sizes {sizes} must lie in 1..{len(pool)} (the pool size)")
    labels = pool_labels(pool)
    nested = strategy in NESTED
    if nested:
        full = select(sizes[-1], strategy, seed=seed, pool_size=len(pool), labels=labels, features=features)
        orderings = {k: full[:k] for k in sizes}
    else:
        orderings = {k: select(k, strategy, seed=seed, pool_size=len(pool), labels=labels, features=features)
                     for k in sizes}
    stats = _stats_for_sizes(model, pool, orderings, nested, batch_size, progress)
    variants = {k: stats[k] for k in sizes}
    if pool_stats is not None:
        variants["pool"] = pool_stats
    sessions = {k: make_session(export_qdq(model, calibrate(st, method), placement=placement).model)
                for k, st in variants.items()}
    fp32 = make_session(model.proto)
    out_name = model.output_names[0]
    agree = {k: 0 for k in sessions}
    cos = {k: 0.0 for k in sessions}
    n = 0
    total = len(eval_source)
    for ids, feeds, _ in batches(eval_source, model.inputs, batch_size):
        ref = fp32.run([out_name], feeds)[0].reshape(len(ids), -1).astype(np.float64)
        for k, s in sessions.items():
            q = s.run([out_name], feeds)[0].reshape(len(ids), -1).astype(np.float64)
            agree[k] += int((q.argmax(1) == ref.argmax(1)).sum())
            den = np.linalg.norm(q, axis=1) * np.linalg.norm(ref, axis=1)
            cos[k] += float(np.where(den > 0, (q * ref).sum(1) / np.where(den > 0, den, 1), 1.0).sum())
        n += len(ids)
        if progress:
            progress("evaluate INT8", n, total)
    if n == 0:
        raise InputDataError("the evaluation set is empty")
    return [{"size": k if k != "pool" else len(pool), "subset": "pool" if k == "pool" else strategy,
             "top1_agreement": agree[k] / n, "mean_cosine": cos[k] / n, "n_eval": n} for k in sessions]


def coverage(model, pool, indices: Sequence[int], *, eval_source=None, method: str = "entropy",
             strategy: str = "random", seed: int = 0, sizes: Sequence[int] | None = None, curve: bool = True,
             placement: str = "trt", batch_size: int = 16, progress: Progress | None = None) -> dict:
    """The coverage report of ``take(pool, indices)`` (see module doc) as a JSON-able dict."""
    idx = np.asarray([int(i) for i in indices], dtype=np.int64)
    if len(idx) == 0 or idx.min() < 0 or idx.max() >= len(pool):
        raise InputDataError(f"subset indices must lie in 0..{len(pool) - 1}")
    pool_stats = collect(model, pool, batch_size=batch_size, progress=progress)
    sub_stats = collect(model, take(pool, idx), batch_size=batch_size)
    tensors = range_coverage(pool_stats, sub_stats, method)
    X, names = model_features(model, pool, batch_size=batch_size, progress=progress)
    X = reduce_features(X, seed=seed)
    rng = np.random.default_rng(seed)
    rand = [radius(X, rng.permutation(len(pool))[:len(idx)]) for _ in range(5)]
    labels = pool_labels(pool)
    balance = None
    if labels is not None:
        classes = sorted({int(v) for v in labels if v is not None})
        balance = {"classes": classes, "pool": [sum(1 for v in labels if v == c) for c in classes],
                   "subset": [sum(1 for i in idx if labels[i] == c) for c in classes]}
    ratios = np.array([r["ratio"] for r in tensors], dtype=np.float64)
    clipped = np.array([r["clipped_pool_fraction"] for r in tensors], dtype=np.float64)
    report = {
        "format": "calib.coverage", "version": COVERAGE_FORMAT_VERSION, "method": method,
        "pool_size": len(pool), "subset_size": int(len(idx)), "subset_ids": [pool_ids(pool)[i] for i in idx],
        "summary": {"median_amax_ratio": float(np.nanmedian(ratios)), "min_amax_ratio": float(np.nanmin(ratios)),
                    "max_clipped_pool_fraction": float(clipped.max()),
                    "mean_clipped_pool_fraction": float(clipped.mean())},
        "tensors": tensors,
        "feature_space": {"features": names, "kcenter_radius": radius(X, idx),
                          "random_radius_median": float(np.median(rand))},
        "class_balance": balance,
        "curve": None,
    }
    if curve:
        ev = eval_source if eval_source is not None else pool
        report["curve"] = {"strategy": strategy, "placement": placement, "eval_size": len(ev),
                           "points": agreement_curve(model, pool, ev, sizes or default_sizes(len(pool)),
                                                     strategy=strategy, seed=seed, features=X, method=method,
                                                     placement=placement, pool_stats=pool_stats,
                                                     batch_size=batch_size, progress=progress)}
    return report


def figures(report: dict) -> dict:
    """Plotly figures of a coverage report: 'curve', 'ranges', 'balance' (those with data)."""
    import plotly.graph_objects as go

    figs = {}
    if report.get("curve"):
        pts = [p for p in report["curve"]["points"] if p["subset"] != "pool"]
        ref = [p for p in report["curve"]["points"] if p["subset"] == "pool"]
        f = go.Figure()
        f.add_trace(go.Scatter(x=[p["size"] for p in pts], y=[100 * p["top1_agreement"] for p in pts],
                               mode="lines+markers", name=f"{report['curve']['strategy']} subsets"))
        f.add_trace(go.Scatter(x=[p["size"] for p in pts], y=[p["mean_cosine"] for p in pts], yaxis="y2",
                               mode="lines+markers", line_dash="dot", name="mean output cosine (right axis)"))
        f.update_layout(yaxis2=dict(title="mean cosine", overlaying="y", side="right"))
        if ref:
            f.add_hline(y=100 * ref[0]["top1_agreement"], line_dash="dash",
                        annotation_text=f"whole pool ({ref[0]['size']} samples)")
        f.update_layout(title=f"INT8 vs FP32 top-1 agreement on {report['curve']['eval_size']} evaluation samples "
                              f"({report['method']} calibration)", xaxis_title="calibration samples",
                        yaxis_title="top-1 agreement (%)", xaxis_type="log", template="plotly_white")
        figs["curve"] = f
    t = report["tensors"]
    f = go.Figure()
    f.add_trace(go.Bar(x=list(range(len(t))), y=[r["ratio"] for r in t], name="subset amax / pool amax",
                       hovertext=[r["tensor"] for r in t]))
    f.add_trace(go.Scatter(x=list(range(len(t))), y=[100 * r["clipped_pool_fraction"] for r in t], yaxis="y2",
                           mode="markers", name="% of pool values clipped", hovertext=[r["tensor"] for r in t]))
    f.update_layout(title=f"Ranges of a {report['subset_size']}-sample subset against the pool of "
                          f"{report['pool_size']}", xaxis_title="tensor (topological order)",
                    yaxis_title="amax ratio", yaxis2=dict(title="% clipped", overlaying="y", side="right"),
                    template="plotly_white")
    figs["ranges"] = f
    if report.get("class_balance"):
        b = report["class_balance"]
        f = go.Figure()
        for key in ("pool", "subset"):
            tot = sum(b[key]) or 1
            f.add_trace(go.Bar(x=[str(c) for c in b["classes"]], y=[100 * v / tot for v in b[key]], name=key))
        f.update_layout(title="Class balance", xaxis_title="class", yaxis_title="% of samples", barmode="group",
                        template="plotly_white")
        figs["balance"] = f
    return figs


def write_html(report: dict, path) -> None:
    """One HTML page with every figure (plotly.js inlined, so it opens offline)."""
    figs = figures(report)
    parts = [f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figs.values())]
    s = report["summary"]
    fs = report["feature_space"]
    head = (f"<h1>Calibration subset coverage</h1><p>{report['subset_size']} of {report['pool_size']} samples, "
            f"{report['method']} calibration. Median amax ratio {s['median_amax_ratio']:.3f}; at most "
            f"{100 * s['max_clipped_pool_fraction']:.4f}% of a tensor's pool values clipped. k-center radius "
            f"{fs['kcenter_radius']:.3f} (random subsets of the same size: {fs['random_radius_median']:.3f}).</p>")
    write_text(path, "<!doctype html><html><head><meta charset='utf-8'><title>calib coverage</title></head><body>"
               + head + "".join(parts) + "</body></html>\n")
