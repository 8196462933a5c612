"""Runs: the run store as a table; pick one or two runs; start a new run in the background."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

import state
import widgets
from calib.errors import CalibError

st.title("Runs")

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


st.header("New run")
with st.form("new_run"):
    c1, c2 = st.columns(2)
    model = c1.text_input("FP32 ONNX model (path)", key="nr_model")
    name = c2.text_input("run name (default: the model's file name)", key="nr_name")
    calib_data = c1.text_input("calibration data (image folder, manifest .csv/.jsonl, .npz)", key="nr_calib")
    eval_data = c2.text_input("evaluation data (optional; needed for the per-layer comparison)", key="nr_eval")
    from calib.calibrate import METHODS

    methods = c1.multiselect("methods", list(METHODS), default=list(METHODS), key="nr_methods")
    primary = c2.selectbox("method of the exported model", list(METHODS), key="nr_primary",
                           index=list(METHODS).index("entropy") if "entropy" in METHODS else 0)
    strategy = c1.selectbox("calibration subset", ["", "random", "stratified", "kmeans", "kcenter"],
                            format_func=lambda s: s or "all samples", key="nr_strategy")
    size = c2.number_input("subset size", 0, 100000, 0, key="nr_size")
    submitted = st.form_submit_button("Start run", type="primary")

if submitted:
    try:
        from calib.config import RunConfig
        from calib.errors import ConfigError

        problems = []
        if not model or not Path(model).expanduser().is_file():
            problems.append(f"model: no such file {model!r}")
        if not calib_data or not Path(calib_data).expanduser().exists():
            problems.append(f"calibration data: no such file or folder {calib_data!r}")
        if eval_data and not Path(eval_data).expanduser().exists():
            problems.append(f"evaluation data: no such file or folder {eval_data!r}")
        if not methods:
            problems.append("methods: choose at least one")
        if strategy and not size:
            problems.append("subset size: give the number of samples to pick")
        if problems:
            raise ConfigError("; ".join(problems), hint="fix the paths above; nothing was started")
        mp = Path(model).expanduser().resolve()
        cfg = RunConfig(name=name or mp.stem, store=state.store_root(), model=mp,
                        calib_data=Path(calib_data).expanduser().resolve(),
                        eval_data=Path(eval_data).expanduser().resolve() if eval_data else None,
                        methods=list(dict.fromkeys([*methods, primary])), primary=primary, skip_bad=True,
                        sampling_strategy=strategy, sampling_n=int(size) if strategy else 0)
        state.start_run(NEW_RUN_JOB, f"run {cfg.name}", cfg)
    except CalibError as e:
        state.show_error(e, "cannot start the run")

job = widgets.job_progress(NEW_RUN_JOB)
if job is not None and not job.running and job.result:
    st.success(f"run {job.result} finished")
