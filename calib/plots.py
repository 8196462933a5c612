"""Plotly figures shared by the HTML report and the dashboard.

Every function takes plain data (report rows, sensitivity rows, a histogram,
the advise curve) and returns a ``plotly.graph_objects.Figure``; nothing here
computes metrics or reads files.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

__all__ = ["error_vs_depth", "worst_layers", "sensitivity_ranking", "histogram_thresholds", "advise_curve",
           "METRIC_LABELS"]

METRIC_LABELS = {
    "sqnr_db": "SQNR (dB, higher is better)",
    "cosine": "cosine similarity (mean per sample)",
    "relative_error": "relative error ||e|| / ||fp32||",
    "max_abs_error": "max |error|",
    "mean_abs_error": "mean |error|",
    "local_sqnr_db": "local SQNR (dB): the layer alone in INT8 on FP32 inputs",
    "local_cosine": "local cosine: the layer alone in INT8 on FP32 inputs",
    "local_relative_error": "local relative error: the layer alone in INT8",
    "local_max_abs_error": "local max |error|: the layer alone in INT8",
}
_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=50, b=50), height=420)


def _num(x: Any) -> float:
    if isinstance(x, str):
        return float(x)
    return float(x) if x is not None else math.nan


def _finite(values: Sequence[float], cap: float | None = None) -> list[float]:
    """Replace +inf (exact match) by ``cap`` so it can be drawn; keep finite values."""
    fin = [v for v in values if math.isfinite(v)]
    top = cap if cap is not None else (max(fin) + 10 if fin else 100.0)
    return [v if math.isfinite(v) else (top if v > 0 else math.nan) for v in values]


def error_vs_depth(layers: Sequence[Mapping[str, Any]], metric: str = "sqnr_db") -> go.Figure:
    """Each compared layer at its topological depth, coloured by op type; hover shows node and tensor."""
    fig = go.Figure()
    ops = sorted({r["op_type"] for r in layers})
    vals_all = _finite([_num(r[metric]) for r in layers])
    for op in ops:
        idx = [i for i, r in enumerate(layers) if r["op_type"] == op]
        fig.add_trace(go.Scatter(
            x=[layers[i]["depth"] for i in idx], y=[vals_all[i] for i in idx], mode="markers", name=op,
            text=[f"{layers[i]['node']}<br>{layers[i]['fp32_tensor']}" for i in idx],
            hovertemplate="%{text}<br>depth %{x}<br>" + metric + " %{y:.4g}<extra>" + op + "</extra>"))
    fig.update_layout(title=f"{METRIC_LABELS.get(metric, metric)} vs depth", xaxis_title="depth (nodes from input)",
                      yaxis_title=METRIC_LABELS.get(metric, metric), **_LAYOUT)
    return fig


def worst_layers(layers: Sequence[Mapping[str, Any]], k: int = 20, metric: str = "sqnr_db") -> go.Figure:
    """The ``k`` layers with the lowest ``metric``, worst at the top (layers without a finite value left out).

    With a local metric, the accumulated SQNR of the same layers is drawn beside it: a layer whose local error
    is low causes loss; one with a low accumulated but a high local SQNR inherits it."""
    rows = sorted((r for r in layers if not math.isnan(_num(r.get(metric)))), key=lambda r: _num(r[metric]))
    rows = rows[:k][::-1]
    vals = _finite([_num(r[metric]) for r in rows])
    names = [f"{r['node']} ({r['op_type']})" for r in rows]
    bars = [go.Bar(x=vals, y=names, orientation="h", name=METRIC_LABELS.get(metric, metric),
                   text=[f"{v:.3g}" for v in vals], textposition="auto",
                   hovertext=[f"{r['fp32_tensor']} depth {r['depth']} cosine {_num(r['cosine']):.5f}" for r in rows])]
    if metric.startswith("local_") and metric[6:] in {"sqnr_db", "cosine"}:
        acc = _finite([_num(r[metric[6:]]) for r in rows])
        bars.append(go.Bar(x=acc, y=names, orientation="h", name=f"accumulated {metric[6:]} (all layers INT8)",
                           text=[f"{v:.3g}" for v in acc], textposition="auto"))
    fig = go.Figure(bars)
    short = {"sqnr_db": "SQNR", "local_sqnr_db": "local SQNR", "local_cosine": "local cosine"}.get(metric, metric)
    title = f"worst {len(rows)} layers by {short}" + (": where the error enters" if metric.startswith("local_")
                                                        else "")
    fig.update_layout(title=title, xaxis_title=METRIC_LABELS.get(metric, metric), barmode="group",
                      **{**_LAYOUT, "height": max(300, (40 if len(bars) > 1 else 24) * len(rows) + 120)})
    return fig


def sensitivity_ranking(rows: Sequence[Mapping[str, Any]], k: int = 25) -> go.Figure:
    """Output SQNR with only each node quantized and with only each node in float (top ``k`` by rank)."""
    top = list(rows)[:k][::-1]
    q = _finite([_num(r["quant_only"]["sqnr_db"]) for r in top])
    f = _finite([_num(r["float_only"]["sqnr_db"]) for r in top])
    names = [f"{r['rank']}. {r['node']} ({r['op_type']})" for r in top]
    fig = go.Figure([
        go.Bar(x=q, y=names, orientation="h", name="only this node quantized"),
        go.Bar(x=f, y=names, orientation="h", name="only this node in float"),
    ])
    fig.update_layout(title="sensitivity: output SQNR (dB) per quantized node", barmode="group",
                      xaxis_title="output SQNR (dB)", **{**_LAYOUT, "height": max(320, 36 * len(top) + 120)})
    return fig


def histogram_thresholds(hist: Any, thresholds: Mapping[str, float], tensor: str = "") -> go.Figure:
    """The |x| histogram of a tensor (log counts) with each method's amax drawn as a vertical line.

    ``hist`` is a ``calib.stats.TensorHistogram`` (or anything with ``abs_counts()`` and ``bin_width``).
    """
    counts = np.asarray(hist.abs_counts())
    nz = np.nonzero(counts)[0]
    last = int(nz[-1]) + 1 if nz.size else 1
    top = max([last * hist.bin_width] + [float(a) for a in thresholds.values()])
    n_show = min(len(counts), int(math.ceil(top / hist.bin_width)) + 1)
    # merge bins so at most ~256 bars are drawn
    step = max(1, int(math.ceil(n_show / 256)))
    c = counts[:n_show]
    c = np.concatenate([c, np.zeros((-len(c)) % step, c.dtype)]).reshape(-1, step).sum(axis=1)
    centres = (np.arange(len(c)) + 0.5) * hist.bin_width * step
    fig = go.Figure(go.Bar(x=centres, y=np.where(c > 0, c, np.nan), name="|x| count", marker_color="#7f8c8d",
                           width=hist.bin_width * step))
    palette = ["#e74c3c", "#2980b9", "#27ae60", "#8e44ad", "#d35400", "#16a085"]
    ymax = float(c.max()) if c.size and c.max() > 0 else 1.0
    for i, (label, amax) in enumerate(thresholds.items()):
        colour = palette[i % len(palette)]
        fig.add_trace(go.Scatter(x=[float(amax), float(amax)], y=[0.8, ymax * 2], mode="lines",
                                 line=dict(color=colour, width=2, dash="dash"), name=f"{label}: amax {float(amax):.4g}",
                                 hovertemplate=f"{label}<br>amax {float(amax):.5g}<extra></extra>"))
    fig.update_layout(title=f"|x| histogram of {tensor} with each method's threshold", xaxis_title="|x|",
                      yaxis_title="count", yaxis_type="log", bargap=0, legend=dict(x=0.99, xanchor="right", y=0.99),
                      **_LAYOUT)
    return fig


def advise_curve(curve: Sequence[Mapping[str, Any]], target: float | None = None, metric: str = "") -> go.Figure:
    """Target metric after each advise step against the number of float nodes."""
    xs = [c["n_float_nodes"] for c in curve]
    ys = _finite([_num(c["metric"]) for c in curve])
    text = [f"step {c['step']}: {c['action']} {c.get('node') or ''}" for c in curve]
    fig = go.Figure(go.Scatter(x=xs, y=ys, mode="lines+markers", text=text, name=metric or "metric",
                               hovertemplate="%{text}<br>%{y:.6g}<extra></extra>"))
    if target is not None:
        fig.add_hline(y=target, line=dict(color="#e74c3c", dash="dash"), annotation_text=f"target {target:g}")
    fig.update_layout(title=f"advise: {metric} vs number of float nodes", xaxis_title="nodes left in float",
                      yaxis_title=metric, **_LAYOUT)
    return fig
