"""Plotly figures of the dashboard that ``calib.plots`` does not provide.

Each function takes plain data (rows, arrays, ``TensorDrift``/``LayerValues`` from
``calib.drift``) and returns a ``plotly.graph_objects.Figure``; nothing is computed
here beyond choosing what to draw.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = ["METRIC_LABELS", "depth_figure", "histogram_figure", "error_figure", "drift_figure",
           "overlay_figure", "delta_figure", "ranges_figure", "novelty_figure"]

METRIC_LABELS = {"cosine": "cosine (mean over samples)", "sqnr_db": "SQNR (dB)",
                 "relative_error": "relative error ||e|| / ||fp32||", "max_abs_error": "max |error|",
                 "mean_abs_error": "mean |error|", "min_cosine": "min cosine over samples",
                 "local_sqnr_db": "local SQNR (dB, the layer alone in INT8)",
                 "local_cosine": "local cosine (the layer alone in INT8)",
                 "local_relative_error": "local relative error (the layer alone in INT8)"}
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
HIGHER_IS_BETTER = {"cosine": True, "sqnr_db": True, "min_cosine": True, "cosine_global": True,
                    "relative_error": False, "max_abs_error": False, "mean_abs_error": False,
                    "local_sqnr_db": True, "local_cosine": True, "local_relative_error": False}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _layout(fig: go.Figure, title: str, height: int = 420) -> go.Figure:
    fig.update_layout(title=dict(text=title, y=0.98, yanchor="top"), height=height,
                      margin=dict(l=60, r=20, t=80, b=50),
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0), template="plotly_white")
    return fig


def depth_figure(layers: Mapping[str, Sequence[Mapping[str, Any]]], metric: str = "sqnr_db", *,
                 worst: Mapping[str, Sequence[str]] | None = None, selected: str | None = None) -> go.Figure:
    """``metric`` of every compared layer against its depth, one trace per method.

    ``worst``: method -> tensors to mark (drawn as open circles with their node name).
    """
    fig = go.Figure()
    for k, (method, rows) in enumerate(layers.items()):
        rows = [r for r in rows if _finite(r.get(metric))]
        c = _COLORS[k % len(_COLORS)]
        fig.add_trace(go.Scatter(
            x=[r["depth"] for r in rows], y=[r[metric] for r in rows], mode="lines+markers", name=method,
            line=dict(color=c, width=1), marker=dict(size=5, color=c),
            text=[f"{r['node']} ({r['op_type']})<br>{r['fp32_tensor']}" for r in rows],
            hovertemplate="%{text}<br>depth %{x}<br>" + metric + " %{y:.4g}<extra>" + method + "</extra>"))
        marked = set((worst or {}).get(method, ()))
        wr = [r for r in rows if r["fp32_tensor"] in marked]
        if wr:
            fig.add_trace(go.Scatter(
                x=[r["depth"] for r in wr], y=[r[metric] for r in wr], mode="markers", showlegend=False,
                name=f"{method} worst", marker=dict(size=14, color="rgba(0,0,0,0)", line=dict(color=c, width=2)),
                text=[f"worst: {r['node']} ({r['op_type']})" for r in wr],
                hovertemplate="%{text}<br>depth %{x}<br>" + metric + " %{y:.4g}<extra>" + method + "</extra>"))
    if selected is not None:
        for rows in layers.values():
            for r in rows:
                if r["fp32_tensor"] == selected and _finite(r.get(metric)):
                    fig.add_vline(x=r["depth"], line=dict(color="#555", dash="dot"))
                    break
            else:
                continue
            break
    fig.update_xaxes(title="depth (topological)")
    fig.update_yaxes(title=METRIC_LABELS.get(metric, metric))
    return _layout(fig, f"{METRIC_LABELS.get(metric, metric)} through depth")


def histogram_figure(centres: Sequence[float], counts: Sequence[int], bin_width: float,
                     amax: Mapping[str, float], *, title: str = "FP32 activation histogram",
                     log_y: bool = True) -> go.Figure:
    """A signed histogram with every method's threshold drawn at +amax and -amax."""
    fig = go.Figure(go.Bar(x=list(centres), y=list(counts), width=bin_width, marker_color="#7f7f7f",
                           name="FP32 values", hovertemplate="x ≈ %{x:.4g}<br>count %{y}<extra></extra>"))
    for k, (method, a) in enumerate(amax.items()):
        c = _COLORS[k % len(_COLORS)]
        for sign in (1, -1):
            fig.add_vline(x=sign * a, line=dict(color=c, width=2, dash="dash"))
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=dict(color=c, dash="dash"),
                                 name=f"{method} amax {a:.4g}"))
    fig.update_xaxes(title="activation value")
    fig.update_yaxes(title="count", type="log" if log_y else "linear")
    fig.update_layout(bargap=0)
    return _layout(fig, title)


def error_figure(values, *, title: str | None = None) -> go.Figure:
    """INT8 - FP32 error histogram (left) and INT8 against FP32 (right) for one tensor (``LayerValues``)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("error (INT8 − FP32)", "INT8 vs FP32"))
    fig.add_trace(go.Histogram(x=values.error, nbinsx=80, marker_color="#d62728", name="error"), row=1, col=1)
    fig.add_trace(go.Scattergl(x=values.fp32, y=values.int8, mode="markers", name="values",
                               marker=dict(size=3, color="#1f77b4", opacity=0.5)), row=1, col=2)
    if values.fp32.size:
        lo, hi = float(min(values.fp32.min(), values.int8.min())), float(max(values.fp32.max(), values.int8.max()))
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(color="#555", dash="dot"),
                                 name="y = x"), row=1, col=2)
    fig.update_xaxes(title_text="error", row=1, col=1)
    fig.update_yaxes(title_text="count", type="log", row=1, col=1)
    fig.update_xaxes(title_text="FP32", row=1, col=2)
    fig.update_yaxes(title_text="INT8 (Q/DQ)", row=1, col=2)
    fig.update_layout(showlegend=False)
    t = title or (f"{values.fp32_tensor}: {values.n_values:,} values over {values.n_samples} samples"
                  + (f" ({values.fp32.size:,} shown)" if values.fp32.size < values.n_values else ""))
    return _layout(fig, t, height=380)


def drift_figure(rows: Sequence[Mapping[str, Any]], method: str) -> go.Figure:
    """JS distance and ``method``'s clip rate of every tensor against depth."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    rows = sorted(rows, key=lambda r: (r["depth"] if r["depth"] is not None else -1))
    x = [r["depth"] for r in rows]
    text = [r["tensor"] for r in rows]
    fig.add_trace(go.Scatter(x=x, y=[r["js_distance"] for r in rows], mode="markers+lines", name="JS distance",
                             text=text, line=dict(color="#1f77b4", width=1),
                             hovertemplate="%{text}<br>depth %{x}<br>JS %{y:.4f}<extra></extra>"), secondary_y=False)
    key = f"clip_rate:{method}"
    fig.add_trace(go.Scatter(x=x, y=[100 * r.get(key, float("nan")) for r in rows], mode="markers",
                             name=f"clip rate ({method}) %", text=text, marker=dict(color="#d62728", symbol="x"),
                             hovertemplate="%{text}<br>depth %{x}<br>clipped %{y:.3f}%<extra></extra>"),
                  secondary_y=True)
    fig.update_xaxes(title="depth (topological)")
    fig.update_yaxes(title_text="Jensen-Shannon distance", rangemode="tozero", secondary_y=False)
    fig.update_yaxes(title_text="eval values past amax (%)", rangemode="tozero", showgrid=False, tickformat=".2f",
                     secondary_y=True)
    return _layout(fig, "Calibration vs evaluation data, per tensor")


def overlay_figure(runs: Mapping[str, Sequence[Mapping[str, Any]]], metric: str = "sqnr_db") -> go.Figure:
    """Per-layer curves of several runs (run label -> compare rows) overlaid on one depth axis."""
    fig = depth_figure(runs, metric)
    fig.update_layout(title=f"{METRIC_LABELS.get(metric, metric)} through depth, runs overlaid")
    return fig


def delta_figure(deltas: Sequence[Mapping[str, Any]], metric: str, names: tuple[str, str]) -> go.Figure:
    """Per-layer change of ``metric`` from run A to run B (rows of ``calib.drift.layer_deltas``)."""
    better_up = HIGHER_IS_BETTER.get(metric, True)
    colors = ["#2ca02c" if (d["delta"] > 0) == better_up else "#d62728" for d in deltas]
    fig = go.Figure(go.Bar(x=[d["depth"] for d in deltas], y=[d["delta"] for d in deltas], marker_color=colors,
                           text=[f"{d['node']} ({d['op_type']})" for d in deltas], textposition="none",
                           hovertemplate="%{text}<br>depth %{x}<br>change %{y:.4g}<extra></extra>"))
    fig.add_hline(y=0, line=dict(color="#555", width=1))
    fig.update_xaxes(title="depth (topological)")
    fig.update_yaxes(title=f"{METRIC_LABELS.get(metric, metric)}: {names[1]} − {names[0]}")
    return _layout(fig, f"Change per layer: {names[1]} − {names[0]} (green: {names[1]} is better there, "
                        f"red: worse)", height=320)


def ranges_figure(amax_a: Mapping[str, float], amax_b: Mapping[str, float], names: tuple[str, str]) -> go.Figure:
    """amax of run B against run A for every tensor both hold (log-log, y = x dotted)."""
    common = [t for t in amax_a if t in amax_b and amax_a[t] > 0 and amax_b[t] > 0]
    xa = [amax_a[t] for t in common]
    yb = [amax_b[t] for t in common]
    fig = go.Figure(go.Scatter(x=xa, y=yb, mode="markers", text=common, marker=dict(size=6, color="#1f77b4"),
                               hovertemplate="%{text}<br>A %{x:.4g}<br>B %{y:.4g}<extra></extra>", name="tensors"))
    if common:
        lo, hi = min(xa + yb), max(xa + yb)
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(color="#555", dash="dot"),
                                 name="y = x"))
    fig.update_xaxes(title=f"amax, {names[0]}", type="log")
    fig.update_yaxes(title=f"amax, {names[1]}", type="log")
    return _layout(fig, "Calibrated ranges, run against run")


def novelty_figure(rows: Sequence[Mapping[str, Any]], *, flagged: Sequence[str] = ()) -> go.Figure:
    """Novelty score of every evaluation sample, most novel first; flagged ones in red."""
    fl = set(flagged)
    fig = go.Figure(go.Bar(x=list(range(len(rows))), y=[r["score"] for r in rows], text=[r["id"] for r in rows],
                           textposition="none", marker_color=["#d62728" if r["id"] in fl else "#7f7f7f" for r in rows],
                           hovertemplate="%{text}<br>score %{y:.3f}<extra></extra>"))
    fig.add_hline(y=1.0, line=dict(color="#555", dash="dot"))
    fig.update_xaxes(title="evaluation samples, most novel first")
    fig.update_yaxes(title="distance to nearest calibration sample / typical")
    return _layout(fig, "How unlike the calibration set each evaluation sample is", height=320)
