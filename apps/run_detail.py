"""One run's result on the Runs page: the shipped model (downloads), its float groups, sensitivity and the
advise curve. Reads artifacts through ``state``; figures come from ``calib.plots``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

import state
from calib import plots
from calib.compare.html import inline_plotly
from calib.errors import CalibError
from calib.runs import Run

DOWNLOADS = (  # artifact key, button label, mime type
    ("model", "Q/DQ model (.onnx)", "application/octet-stream"),
    ("cache", "TensorRT cache", "text/plain"),
    ("report", "report (.html, self-contained)", "text/html"),
    ("scales", "scales.json", "application/json"),
    ("advise", "advise.json", "application/json"),
)


def _reader(key: str, path: Path):
    if key == "report":  # the page links the run's shared plotly.min.js: inline it for a file that travels alone
        return lambda: inline_plotly(path.read_text(encoding="utf-8"))
    return path.read_bytes


def downloads(run: Run) -> None:
    have = [(k, label, mime, run.artifact(k)) for k, label, mime in DOWNLOADS]
    have = [(k, label, mime, p) for k, label, mime, p in have if p is not None and p.exists()]
    if not have:
        st.info(f"run {run.id} wrote no model yet ({run.status})")
        return
    cols = st.columns(len(have))
    for col, (k, label, mime, p) in zip(cols, have):
        col.download_button(label, data=_reader(k, p), file_name=p.name if k != "report" else f"{run.id}.html",
                            mime=mime, key=f"dl_{k}_{run.id}", on_click="ignore", width="stretch")
    st.caption("files: " + ", ".join(f"`{p}`" for _, _, _, p in have))


def _advice(run: Run) -> dict[str, Any] | None:
    if "advise" not in run.manifest.get("artifacts", {}):
        return None
    try:
        return run.read_json("advise")
    except CalibError as e:
        state.show_error(e)
        return None


def _sensitivity_rows(run: Run, advice: dict | None) -> list[dict]:
    sens = (advice or {}).get("sensitivity") or {}
    if sens.get("rows"):
        return sens["rows"]
    method = run.manifest.get("method", "")
    if method in state.compare_methods(run):
        p = run.artifact(f"compare:{method}")
        import json

        doc = json.loads(p.read_text())
        return (doc.get("sensitivity") or {}).get("rows") or []
    return []


def shipped(run: Run) -> None:
    """The shipped model: method, float groups, per-tensor method changes, the advise curve, sensitivity."""
    m = run.manifest
    met = m.get("metrics") or {}
    advice = _advice(run)
    facts = {"method": m.get("method", ""), "calibration samples": m.get("n_samples", ""),
             "target": met.get("target", "none"), "target met": met.get("target_met", "")}
    if advice:
        facts.update({"float nodes": len(advice.get("exclude") or []),
                      f"{(advice.get('target') or ':').split(':')[0]} of the shipped model": advice.get("metric"),
                      "advise stopped": advice.get("stopped", "")})
    st.table([{"": k, "value": str(v)} for k, v in facts.items()], hide_index=True)
    downloads(run)
    if not run.is_complete:
        return
    if not advice:
        st.caption("no advise in this run (it had no target): every quantizable node is INT8")
        return
    groups = advice.get("exclude") or []
    changed = advice.get("changed_methods") or {}
    c1, c2 = st.columns(2)
    c1.markdown("**Nodes kept in float** (advise, in the order it chose them)")
    c1.dataframe([{"step": k + 1, "node": n} for k, n in enumerate(groups)] or [{"node": "none"}], hide_index=True,
                 width="stretch")
    c2.markdown("**Tensors calibrated with another method**")
    c2.dataframe([{"tensor": t, "method": meth} for t, meth in changed.items()] or [{"tensor": "none"}],
                 hide_index=True, width="stretch")
    t = advice.get("target", "")
    tv = float(t.split(":", 1)[1]) if ":" in t else None
    if advice.get("curve"):
        st.plotly_chart(plots.advise_curve(advice["curve"], tv, t.split(":")[0]), width="stretch",
                        key=f"advise_curve_{run.id}")
    rows = _sensitivity_rows(run, advice)
    if rows:
        st.plotly_chart(plots.sensitivity_ranking(rows), width="stretch", key=f"sens_{run.id}")
    else:
        st.caption("no sensitivity ranking (advise met the target before it needed one)")
