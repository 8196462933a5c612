"""Runs: the run store as a table; pick one or two runs; start a new run in the background."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

import run_detail
import state
import widgets
from calib.errors import CalibError
from new_run import new_run_form

st.title("Runs")
widgets.store_jobs()

NEW_RUN_JOB = "new-run"
KEY_METRICS = ("top1_agreement", "output_cosine", "cosine", "sqnr_db", "accuracy_int8", "target_met", "float_nodes")


def _key_metrics(metrics: dict) -> str:
    parts = []
    for k in KEY_METRICS:
        v = metrics.get(k)
        if isinstance(v, bool):
            parts.append(f"{k} {v}")
        elif isinstance(v, (int, float)):
            parts.append(f"{k} {v:.4g}")
    return ", ".join(parts)


def runs_table(infos) -> None:
    rows = [{"id": i.id, "status": i.status, "model": Path(i.model).name if i.model else "",
             "data": i.data, "method": i.method, "key metrics": _key_metrics(i.metrics or {}),
             "date": i.created.replace("T", " ")[:19], "error": i.error or ""} for i in infos]
    st.dataframe(rows, hide_index=True, width="stretch",
                 column_config={"error": st.column_config.TextColumn("error", width="medium")})


infos = state.list_runs()
if not infos:
    state.no_store_message()
else:
    runs_table(infos)
    bad = [i for i in infos if i.status in ("unreadable", "failed", "incomplete")]
    for i in bad:
        if i.status == "unreadable":
            st.error(f"{i.path.name}: {i.error}")
    ok_ids = [i.id for i in infos if i.status != "unreadable"]
    current = [r for r in state.selected_runs() if r in ok_ids]
    picked = st.multiselect("Open one run (Layers, Data drift, Calibration set) or two (Compare runs)", ok_ids,
                            default=current or ok_ids[:1], max_selections=2, key="runs_pick")
    state.select_runs(picked)
    if picked:
        cols = st.columns(2)
        if cols[0].button("Open layers", disabled=len(picked) < 1):
            st.switch_page("views/layers.py")
        if cols[1].button("Compare these runs", disabled=len(picked) < 2):
            st.switch_page("views/compare_runs.py")
        try:
            shown = state.get_run(picked[0])
        except CalibError as e:
            state.show_error(e)
        else:
            st.header(f"Shipped model of {shown.id}")
            run_detail.shipped(shown)


st.header("New run")
new_run_form(NEW_RUN_JOB)
job = widgets.job_progress(NEW_RUN_JOB)
if job is not None and not job.running and job.result:
    st.success(f"run {job.result} finished")
