"""The HTML report: opens with no network.

``render_html`` inlines plotly.js once (a self-contained page, ~5 MB). ``write_html`` writes the
page with ``<script src="plotly.min.js">`` and one shared ``plotly.min.js`` beside it, so a run
directory with several reports holds the bundle once. ``inline_plotly`` turns such a page back into
a self-contained one (for a download).
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from calib import plots
from calib.calibrate import calibrate
from calib.compare.report import CompareReport, ranking_metric
from calib.io import write_text

__all__ = ["render_html", "write_html", "histogram_tensors", "write_plotly_bundle", "inline_plotly", "PLOTLY_JS"]

PLOTLY_JS = "plotly.min.js"
_SCRIPT_TAG = f'<script src="{PLOTLY_JS}"></script>'

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1280px;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em} td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:right}
th{background:#f6f6f6;position:sticky;top:0} td.l,th.l{text-align:left}
.note{color:#666;font-size:.9em} .bad{color:#c0392b;font-weight:600} .grid{display:grid;grid-template-columns:1fr 1fr}
"""


def _f(x: Any, fmt: str = ".4g") -> str:
    if isinstance(x, str):
        return html.escape(x)
    if x is None:
        return ""
    if isinstance(x, float):
        if math.isinf(x):
            return "∞" if x > 0 else "-∞"
        return format(x, fmt)
    return html.escape(str(x))


def histogram_tensors(report: CompareReport, stats: Any, k: int = 6) -> list[str]:
    """Tensors to draw histograms for: inputs of the most sensitive nodes, then the worst layers' tensors."""
    have = set(getattr(stats, "tensors", {}))
    out: list[str] = []
    if report.sensitivity:
        from_nodes = [r["node"] for r in report.sensitivity.get("rows", [])]
        inputs = report.mapping.get("node_inputs", {})
        for n in from_nodes:
            for t in inputs.get(n, []):
                if t in have and t not in out:
                    out.append(t)
    for r in report.worst(len(report.layers)):
        if r["fp32_tensor"] in have and r["fp32_tensor"] not in out:
            out.append(r["fp32_tensor"])
    return out[:k]


def _thresholds(stats: Any, tensor: str, methods: Sequence[str]) -> dict[str, float]:
    out = {}
    for m in methods:
        r = calibrate(stats, m, tensors=[tensor])
        out[r.method] = r.tensors[tensor].amax
    return out


def render_html(report: CompareReport, *, stats: Any = None, methods: Sequence[str] = ("minmax", "percentile",
                "entropy", "mse"), advice: Mapping[str, Any] | None = None, title: str = "calib: FP32 vs INT8",
                n_histograms: int = 6, plotlyjs: bool | str = True) -> str:
    """The report as one HTML page (figures from ``calib.plots``).

    ``plotlyjs``: True inlines the bundle once; ``"directory"`` links ``plotly.min.js`` beside the page.
    """
    figs: list[tuple[str, Any]] = []
    layers = report.layers
    if layers:
        key = ranking_metric(layers)
        figs.append(("Error vs depth (accumulated: every layer INT8)", plots.error_vs_depth(layers, "sqnr_db")))
        if key != "sqnr_db":
            figs.append(("Local error vs depth (each layer alone in INT8 on FP32 inputs: where the error enters)",
                         plots.error_vs_depth([r for r in layers if r.get("local_sqnr_db") is not None],
                                              "local_sqnr_db")))
        figs.append(("Cosine vs depth", plots.error_vs_depth(layers, "cosine")))
        figs.append(("Worst layers", plots.worst_layers(layers, 20, key)))
    if report.sensitivity and report.sensitivity.get("rows"):
        figs.append(("Sensitivity ranking", plots.sensitivity_ranking(report.sensitivity["rows"])))
    if advice and advice.get("curve"):
        t = advice.get("target", "")
        tv = float(t.split(":", 1)[1]) if ":" in t else None
        figs.append(("Mixed precision (advise)", plots.advise_curve(advice["curve"], tv, t.split(":")[0])))
    if stats is not None:
        for t in histogram_tensors(report, stats, n_histograms):
            figs.append((f"Histogram: {t}", plots.histogram_thresholds(stats[t], _thresholds(stats, t, methods), t)))
    linked = plotlyjs == "directory"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"{_SCRIPT_TAG if linked else ''}<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             _header(report)]
    first = not linked and bool(plotlyjs)
    for name, fig in figs:
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=first, config={"displaylogo": False}))
        first = False
    parts.append(_layer_table(layers))
    parts.append(_skipped(report))
    parts.append("</body></html>")
    return "\n".join(parts)


def _header(report: CompareReport) -> str:
    cfg = report.config
    rows = [f"<p>FP32 <code>{_f(cfg.get('fp32') or '(in memory)')}</code> vs Q/DQ "
            f"<code>{_f(cfg.get('qdq') or '(in memory)')}</code>, "
            f"{report.n_samples} samples, ONNX Runtime optimisation '{_f(cfg.get('optimization'))}'. "
            f"{len(report.layers)} layers compared.</p>",
            "<p class='note'>cosine = mean over samples of the per-sample cosine similarity; SQNR = 10·log10(Σfp32² "
            "/ Σ(int8−fp32)²) over all values; relative error = ‖int8−fp32‖₂ / ‖fp32‖₂.</p>",
            "<table><tr><th class='l'>output</th><th>cosine</th><th>min cosine (sample)</th><th>SQNR dB</th>"
            "<th>max |e|</th><th>top-1 agreement</th><th>accuracy FP32</th><th>accuracy INT8</th></tr>"]
    for o, r in report.outputs.items():
        if o.startswith("_"):
            continue
        rows.append(f"<tr><td class='l'>{_f(o)}</td><td>{_f(r['cosine'], '.6f')}</td>"
                    f"<td>{_f(r['min_cosine'], '.5f')} ({_f(r.get('worst_sample'))})</td><td>{_f(r['sqnr_db'], '.2f')}"
                    f"</td><td>{_f(r['max_abs_error'])}</td><td>{_f(r.get('top1_agreement'))}</td>"
                    f"<td>{_f(r.get('accuracy_fp32'))}</td><td>{_f(r.get('accuracy_int8'))}</td></tr>")
    rows.append("</table>")
    if "_user_metric" in report.outputs:
        u = report.outputs["_user_metric"]
        rows.append(f"<p>user metric <code>{_f(u['name'])}</code>: {_f(u['value'], '.6g')}</p>")
    return "\n".join(rows)


def _layer_table(layers: Sequence[Mapping[str, Any]]) -> str:
    if not layers:
        return ""
    out = ["<h2>All layers (topological order)</h2><table><tr><th class='l'>node</th><th class='l'>op</th>"
           "<th>depth</th><th class='l'>tensor</th><th>cosine</th><th>min cosine</th><th>SQNR dB</th>"
           "<th>local SQNR dB</th><th>max |e|</th><th>mean |e|</th><th>rel. error</th><th class='l'>note</th></tr>"]
    # marked: the five worst by local SQNR (where error enters) when the report has it, else by accumulated SQNR
    key = ranking_metric(layers)
    worst = {id(r) for r in sorted(layers, key=lambda r: r[key] if isinstance(r.get(key), float)
                                   else math.inf)[:5]}
    for r in layers:
        cls = " class='bad'" if id(r) in worst else ""
        out.append(f"<tr{cls}><td class='l'>{_f(r['node'])}</td><td class='l'>{_f(r['op_type'])}</td>"
                   f"<td>{r['depth']}</td><td class='l'>{_f(r['fp32_tensor'])}</td><td>{_f(r['cosine'], '.6f')}</td>"
                   f"<td>{_f(r['min_cosine'], '.5f')}</td><td>{_f(r['sqnr_db'], '.2f')}</td>"
                   f"<td>{_f(r.get('local_sqnr_db'), '.2f')}</td><td>{_f(r['max_abs_error'])}</td><td>{_f(r['mean_abs_error'])}</td>"
                   f"<td>{_f(r['relative_error'])}</td><td class='l'>{_f(r.get('note', ''))}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _skipped(report: CompareReport) -> str:
    sk = report.mapping.get("skipped_tensors", {})
    un = report.mapping.get("unmatched_nodes", [])
    if not sk and not un:
        return ""
    items = "".join(f"<li><code>{_f(t)}</code>: {_f(why)}</li>" for t, why in sk.items())
    return f"<h2>Not compared</h2><ul class='note'>{items}</ul>"


def write_html(path: str | os.PathLike, report: CompareReport, *, plotlyjs: bool | str = "directory",
               **kwargs: Any) -> Path:
    """Render and write atomically; by default with the shared ``plotly.min.js`` beside the page."""
    if plotlyjs == "directory":
        write_plotly_bundle(Path(path).parent)
    return write_text(path, render_html(report, plotlyjs=plotlyjs, **kwargs))


def _bundle() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def write_plotly_bundle(folder: str | os.PathLike) -> Path:
    """``folder/plotly.min.js`` (the installed plotly's bundle), written only if missing or different."""
    out = Path(folder) / PLOTLY_JS
    js = _bundle()
    if out.is_file() and out.stat().st_size == len(js.encode()) and out.read_text(encoding="utf-8") == js:
        return out
    return write_text(out, js)


def inline_plotly(page: str) -> str:
    """A page written by ``write_html`` made self-contained (its bundle link replaced by the bundle)."""
    if _SCRIPT_TAG not in page:
        return page
    return page.replace(_SCRIPT_TAG, f'<script type="text/javascript">{_bundle()}</script>', 1)
