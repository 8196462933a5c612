"""Calibration set: see it, drop and add samples or resample, and re-calibrate into a new run."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

import actions
import state
import widgets
from calib import drift, drift_plots, drift_verdict
from calib.errors import CalibError, InputDataError

st.title("Calibration set")

run = state.pick_run("run", "cs_run")
if run is None:
    st.stop()

try:
    src, table = state.calibration_set(run)
except CalibError as e:
    state.show_error(e)
    st.stop()

rk = str(run.dir)
edits = st.session_state.setdefault("cs_edits", {}).setdefault(rk, {"drop": [], "add": {}})
if table.skipped:
    with st.expander(f"{len(table.skipped)} unreadable file(s) in the calibration data (skipped)", expanded=True):
        st.dataframe([{"file": k, "reason": v} for k, v in table.skipped.items()], hide_index=True)

# ---- the current set ------------------------------------------------------------------
classes = [state.class_name(table, lab) for lab in sorted({lab for lab in table.labels if lab is not None})]
st.caption(f"{len(table.ids)} samples from `{(run.manifest.get('data') or {}).get('path', '')}`"
           + (f", classes {', '.join(classes)}" if any(classes) else ""))
c1, c2 = st.columns(2)
want_classes = c1.multiselect("filter by label", classes, key="cs_labels") if any(classes) else []
q = c2.text_input("filter by id", key="cs_query", placeholder="substring of the sample id")
rows = [{"id": sid, "label": state.class_name(table, lab), "file": f, "dropped": sid in edits["drop"]}
        for sid, lab, f in zip(table.ids, table.labels, table.files)
        if (not want_classes or state.class_name(table, lab) in want_classes) and (not q or q.lower() in sid.lower())]
sig_job = actions.jobs().get(actions.signals_key(run))
if sig_job is None or (not sig_job.running and sig_job.error):
    if st.button("Find the samples that set the ranges (and outliers)", key="cs_signals"):
        try:
            actions.jobs().forget(actions.signals_key(run))
            actions.start_signals(run)
        except CalibError as e:
            state.show_error(e, "cannot compute per-sample signals")
widgets.job_progress(actions.signals_key(run))
signals = sig_job.result if sig_job is not None and not sig_job.running and sig_job.result else None
if signals is not None:
    for r in rows:
        r.update(signals.rows.get(r["id"], {}))
    n_out = sum(1 for v in signals.rows.values() if v["outlier"])
    setters = sorted(signals.rows.items(), key=lambda kv: -kv[1]["ranges_set"])[:5]
    st.caption(f"{len(signals.setters)} tensor ranges (max |x|): set by {sum(1 for v in signals.rows.values() if v['ranges_set'])} "
               f"samples; {n_out} outlier(s) set a max more than {drift_verdict.OUTLIER_RATIO:g}x the runner-up. "
               "Most ranges: " + ", ".join(f"`{i}` ({v['ranges_set']})" for i, v in setters))


def _signal(r: dict) -> str:
    if "ranges_set" not in r:
        return ""
    parts = [f"sets {r['ranges_set']} range{'s' if r['ranges_set'] != 1 else ''}"] if r["ranges_set"] else []
    if r["outlier"]:
        parts.append(f"**outlier** ({r['outlier_ranges']})")
    if r.get("unlike_eval") is not None:
        parts.append(f"unlike eval {r['unlike_eval']:.2f}")
    return " · ".join(parts)


view = st.radio("view", ["gallery", "table"], horizontal=True, key="cs_view")
page, start = widgets.paged(rows, "cs_page", per_page=24)
if view == "gallery" and any(r["file"] for r in page):
    cols = st.columns(6)
    for i, r in enumerate(page):
        with cols[i % 6]:
            im = state.thumb(r["file"])
            if im is not None:
                st.image(im, width="stretch")
            st.caption(("~~" + r["id"] + "~~" if r["dropped"] else r["id"]) + (f" · {r['label']}" if r["label"] else "")
                       + (f"  \n{_signal(r)}" if _signal(r) else ""))
else:
    st.dataframe(page, hide_index=True, width="stretch")

# ---- edits ----------------------------------------------------------------------------
st.header("Edit")
drop = st.multiselect("drop samples", [r["id"] for r in rows] + [d for d in edits["drop"]
                                                                   if d not in {r["id"] for r in rows}],
                      default=edits["drop"], key=f"cs_drop_{rk}")
edits["drop"] = list(drop)

with st.expander("add samples from a folder"):
    folder = st.text_input("image folder or manifest", key="cs_folder")
    if st.button("Scan folder", key="cs_scan") and folder:
        try:
            st.session_state["cs_scanned"] = (folder, *state.scan_folder(run, folder))
        except CalibError as e:
            state.show_error(e, folder)
    scanned = st.session_state.get("cs_scanned")
    if scanned and scanned[0] == folder:
        _, ssrc, stab = scanned
        if stab.skipped:
            st.warning(f"{len(stab.skipped)} unreadable image(s) in {folder}; they are skipped:")
            st.dataframe([{"file": k, "reason": v} for k, v in stab.skipped.items()], hide_index=True)
        new = [(sid, f, lab) for sid, f, lab in zip(stab.ids, stab.files, stab.labels) if f not in
               {a["file"] for a in edits["add"].values()}]
        st.write(f"{len(stab.ids)} readable image(s), {len(new)} not added yet")
        if st.button(f"Add {len(new)} image(s)", key="cs_add_folder", disabled=not new):
            for sid, f, lab in new:
                edits["add"][f] = {"file": f, "label": lab, "from": folder}
            st.rerun()

flagged = st.session_state.get("flagged_eval", {}).get(rk, {})
if flagged:
    todo = {i: v for i, v in flagged.items() if v["file"] and v["file"] not in edits["add"]}
    if st.button(f"Add {len(todo)} evaluation sample(s) flagged on the Data drift page", key="cs_add_flagged",
                 disabled=not todo):
        for i, v in todo.items():
            edits["add"][v["file"]] = {"file": v["file"], "label": v["label"], "from": "flagged"}
        st.rerun()
if edits["add"]:
    st.write(f"to add: {len(edits['add'])} sample(s)")
    st.dataframe([{"file": a["file"], "label": a["label"], "from": a["from"]} for a in edits["add"].values()],
                 hide_index=True, width="stretch")
    if st.button("Clear additions", key="cs_clear_add"):
        edits["add"] = {}
        st.rerun()

n_new = len(table.ids) - len(set(edits["drop"]) & set(table.ids)) + len(edits["add"])
st.metric("samples in the edited set", n_new, delta=n_new - len(table.ids))

job_key = f"recal:{rk}"


def _recalibrate(full: bool) -> None:
    kept = [(sid, f, lab) for sid, f, lab in zip(table.ids, table.files, table.labels) if sid not in edits["drop"]]
    name = f"{run.manifest.get('name') or 'run'}-recal"
    if edits["add"]:
        if any(f is None for _, f, _ in kept):
            raise InputDataError("samples can be added only to image data (this run's data is arrays)",
                                 hint="drop samples or resample instead")
        files = [(f, lab) for _, f, lab in kept] + [(a["file"], a["label"]) for a in edits["add"].values()]
        manifest = actions.write_calibration_manifest(files)
        cfg = state.run_config(run, name=name, store=state.store_root(), calib_data=manifest,
                               sampling_strategy="", sampling_n=0, skip_bad=True)
        actions.start_run(job_key, f"re-calibration of {run.id}", cfg)
        return
    ids = [sid for sid, _, _ in kept]
    if not ids:
        raise InputDataError("every sample was dropped", hint="keep at least one sample")
    if full:
        cfg = state.run_config(run, name=name, store=state.store_root())
        actions.start_run(job_key, f"re-calibration of {run.id}", cfg, calib_ids=ids)
    else:  # ranges only: the untouched shards of statistics are merged, the touched ones collected again
        actions.start_recalibrate(job_key, run, ids)


def _resample(strategy: str, n: int, seed: int) -> None:
    data = (run.manifest.get("data") or {}).get("path", "")
    cfg = state.run_config(run, name=f"{run.manifest.get('name') or 'run'}-{strategy}{n}", store=state.store_root(),
                           calib_data=Path(data), sampling_strategy=strategy, sampling_n=n, sampling_seed=seed)
    actions.start_run(job_key, f"resampling of {run.id}", cfg)


full = st.checkbox("also compare and advise again (a full run: minutes, not seconds)", key="cs_full",
                   help="Off: ranges only. The statistics of the samples you kept are re-merged from the run's "
                        "shards (only shards that held a dropped sample are collected again), then the ranges, the "
                        "Q/DQ model with the run's float nodes, the cache and scales.json are written to a new run.")
c1, c2 = st.columns(2)
busy = bool(actions.jobs().get(job_key) and actions.jobs().get(job_key).running)
if c1.button("Re-calibrate with the edited set", type="primary", key="cs_recal", disabled=busy):
    try:
        _recalibrate(full)
    except CalibError as e:
        state.show_error(e, "cannot re-calibrate")
with c2.popover("Resample from the run's data"):
    strategy = st.selectbox("strategy", ["random", "stratified", "kmeans", "kcenter"], key="cs_strategy")
    size = st.number_input("size", 1, 100000, max(1, len(table.ids) // 2), key="cs_size")
    seed = st.number_input("seed", 0, 2**31 - 1, 0, key="cs_seed")
    if st.button("Resample and re-calibrate", key="cs_resample", disabled=busy):
        try:
            _resample(strategy, int(size), int(seed))
        except CalibError as e:
            state.show_error(e, "cannot resample")

job = widgets.job_progress(job_key)
if job is not None and not job.running and job.result:
    try:
        new_run = state.get_run(job.result)
    except CalibError as e:
        state.show_error(e)
        st.stop()
    st.success(f"new run {new_run.id}")
    st.subheader("The two runs side by side")
    widgets.side_by_side([run, new_run], [f"before: {run.id}", f"after: {new_run.id}"])
    curves = {}
    for label, r in (("before", run), ("after", new_run)):
        meth = r.manifest.get("method", "")
        if meth in state.compare_methods(r):
            curves[f"{label} ({meth})"] = state.compare_report(r, meth)["layers"]
    if curves:
        metric = widgets.metric_select("cs_metric")
        st.plotly_chart(drift_plots.overlay_figure(curves, metric), width="stretch", key="cs_overlay")
        if len(curves) == 2:
            (_, rows_a), (_, rows_b) = curves.items()
            st.plotly_chart(drift_plots.delta_figure(drift.layer_deltas(rows_a, rows_b, metric), metric,
                                                     ("before", "after")), width="stretch", key="cs_delta")
    if st.button("Open both in Compare runs", key="cs_open_compare"):
        state.select_runs([run.id, new_run.id])
        st.switch_page("views/compare_runs.py")
