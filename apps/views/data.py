"""Data drift: how the evaluation data differs from the calibration data, per tensor and per sample."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

import actions
import state
import widgets
from calib import drift_plots, drift_verdict
from calib.errors import CalibError

st.title("Data drift: calibration vs evaluation")

run = state.pick_run("run", "data_run")
if run is None:
    st.stop()

default_eval = (run.manifest.get("data") or {}).get("eval", "")
eval_path = st.text_input("evaluation data", value=default_eval, key=f"data_eval_{run.id}",
                          help="defaults to the run's evaluation data; any folder/manifest/.npz the model reads")
if not eval_path:
    st.info("This run has no evaluation data: enter a folder, manifest or .npz of evaluation samples above.")
    st.stop()
if not Path(eval_path).exists():
    st.error(f"evaluation data: no such file or folder {eval_path!r}")
    st.stop()

key = actions.drift_key(run, eval_path)
job = actions.jobs().get(key)
if job is None or (not job.running and job.error):
    if st.button("Analyse drift", type="primary", key="data_go"):
        try:
            actions.jobs().forget(key)
            actions.start_drift(run, eval_path)
        except CalibError as e:
            state.show_error(e, "cannot analyse")
    st.caption("Runs the FP32 model over the evaluation data to collect its statistics and per-sample features; "
               "nothing is written to the run.")
job = widgets.job_progress(key)
if job is None or job.running or job.error:
    st.stop()

res: actions.DriftResult = job.result
st.caption(f"{res.n_calib} calibration samples vs {res.n_eval} evaluation samples; features from "
           f"`{res.feature_tensor}` (mean over spatial axes)")
if res.skipped:
    with st.expander(f"{len(res.skipped)} unreadable evaluation file(s) skipped", expanded=True):
        st.dataframe([{"file": k, "reason": v} for k, v in res.skipped.items()], hide_index=True)

method = st.selectbox("clip rate against the ranges of", res.methods, key="data_method",
                      index=res.methods.index(run.manifest.get("method")) if run.manifest.get("method") in res.methods
                      else 0)
verdict = drift_verdict.drift_verdict(res.rows, res.novelty, method)
{"ok": st.success, "watch": st.warning, "act": st.error}[verdict.level](f"**Verdict:** {verdict.text}")
st.plotly_chart(drift_plots.drift_figure(res.rows, method), width="stretch", key="data_fig")

st.subheader("Per tensor")
order = st.radio("sort by", ["clip rate", "JS distance", "depth"], horizontal=True, key="data_sort")
sort_key = {"clip rate": f"clip_rate:{method}", "JS distance": "js_distance", "depth": "depth"}[order]
rows = sorted(res.rows, key=lambda r: (r[sort_key] if r[sort_key] == r[sort_key] else -1.0),
              reverse=order != "depth")
found = widgets.search(rows, "data_search")
page, _ = widgets.paged(found, "data_page", per_page=50)
shown = [{"tensor": r["tensor"], "depth": r["depth"], "JS distance": r["js_distance"],
          f"clip rate ({method})": r[f"clip_rate:{method}"], "calib max|x|": r["calib_max_abs"],
          "eval max|x|": r["eval_max_abs"]} for r in page]
st.dataframe(shown, hide_index=True, width="stretch",
             column_config={f"clip rate ({method})": st.column_config.NumberColumn(format="percent"),
                            "JS distance": st.column_config.NumberColumn(format="%.4f")})

st.subheader("Evaluation samples least like the calibration set")
k = st.slider("show the most novel", 1, max(1, len(res.novelty)), min(12, len(res.novelty)), key="data_k")
flagged = st.session_state.setdefault("flagged_eval", {})
top = res.novelty[:k]
st.plotly_chart(drift_plots.novelty_figure(res.novelty, flagged=list(flagged.get(str(run.dir), {}))),
                width="stretch", key="data_nov_fig")
cols = st.columns(6)
for i, r in enumerate(top):
    with cols[i % 6]:
        im = state.thumb(res.files.get(r["id"]))
        if im is not None:
            st.image(im, width="stretch")
        st.caption(f"{r['id']}\nscore {r['score']:.2f}")
st.dataframe([{"id": r["id"], "score": r["score"], "label": r["label"], "nearest calibration sample":
               r["nearest_calib"]} for r in top], hide_index=True, width="stretch")
pick = st.multiselect("flag for the calibration set (add them on the Calibration set page)",
                      [r["id"] for r in top], default=[i for i in flagged.get(str(run.dir), {}) if
                                                        i in {r["id"] for r in top}], key="data_flag")
flagged[str(run.dir)] = {i: {"file": res.files.get(i), "label": next(r["label"] for r in res.novelty if r["id"] == i),
                             "eval_path": res.eval_path} for i in pick}
if pick:
    st.success(f"{len(pick)} evaluation sample(s) flagged for run {run.id}")
