"""Pieces of UI shared by several pages: job progress, paging, run summaries side by side."""

from __future__ import annotations

from typing import Any, Sequence

import streamlit as st

import actions
import state
from calib.errors import CalibError


def job_progress(key: str, *, on_done_rerun: bool = True) -> actions.Job | None:
    """Draw the job ``key``'s progress and poll it every second while it runs; returns the job."""
    job = actions.jobs().get(key)
    if job is None:
        return None

    @st.fragment(run_every=1.0 if job.running else None)
    def _poll() -> None:
        j = actions.jobs().get(key)
        if j is None:
            return
        if j.running:
            total = f"/{j.total}" if j.total else ""
            st.progress(j.fraction, text=f"{j.label}: {j.stage} {j.done}{total}")
        elif on_done_rerun and not st.session_state.get(f"_seen_{key}_{j.finished}"):
            st.session_state[f"_seen_{key}_{j.finished}"] = True
            st.rerun()

    _poll()
    if not job.running and job.error:
        st.error(f"{job.label} failed: {job.error}")
        if job.hint:
            st.caption(f"hint: {job.hint}")
    return job


def paged(rows: Sequence[Any], key: str, per_page: int = 50) -> tuple[Sequence[Any], int]:
    """The current page of ``rows`` (a number input picks the page); returns (rows, first index)."""
    n = len(rows)
    pages = max(1, -(-n // per_page))
    if pages > 1:
        page = st.number_input(f"page (of {pages}, {per_page} per page)", 1, pages, 1, key=key)
    else:
        page = 1
    start = (int(page) - 1) * per_page
    return rows[start:start + per_page], start


def search(rows: Sequence[dict], key: str, field: str = "tensor", label: str = "search layer / tensor name"
           ) -> list[dict]:
    q = st.text_input(label, key=key, placeholder="substring, case-insensitive")
    if not q:
        return list(rows)
    ql = q.lower()
    return [r for r in rows if ql in str(r.get(field, "")).lower() or ql in str(r.get("node", "")).lower()]


KEY_OUTPUT_METRICS = ("cosine", "sqnr_db", "top1_agreement", "accuracy_int8", "accuracy_fp32")


def run_summary(run) -> dict[str, Any]:
    """Plain facts of a run for a side-by-side table (read from its manifest and artifacts)."""
    m = run.manifest
    out: dict[str, Any] = {
        "id": run.id, "status": run.status, "created": m.get("created", ""),
        "model": (m.get("model") or {}).get("path", ""), "data": (m.get("data") or {}).get("path", ""),
        "eval data": (m.get("data") or {}).get("eval", ""), "method": m.get("method", ""),
        "calibration samples": m.get("n_samples", ""),
    }
    try:
        ids = state.calib_ids(run)
    except CalibError:
        ids = None
    out["calibration set"] = f"{len(ids)} chosen ids" if ids is not None else "all samples of the data"
    cfg = state.config_dict(run)
    out["placement"] = cfg.get("placement", "")
    out["excluded (config)"] = ", ".join(cfg.get("exclude", [])) or "none"
    try:
        adv = run.read_json("advise") if "advise" in m.get("artifacts", {}) else None
    except CalibError:
        adv = None
    if adv:
        out["float nodes (advise)"] = ", ".join(adv.get("exclude", [])) or "none"
    for k in ("target", "target_met", "float_nodes", "advised_metric"):
        if k in (m.get("metrics") or {}):
            out[k] = m["metrics"][k]
    for meth, vals in (m.get("metrics_by_method") or {}).items():
        for k in KEY_OUTPUT_METRICS:
            v = (vals or {}).get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{meth}: output {k}"] = v
    return out


def side_by_side(runs: Sequence, labels: Sequence[str] | None = None) -> None:
    """A table with one column per run and one row per fact."""
    sums = [run_summary(r) for r in runs]
    keys = list(dict.fromkeys(k for s in sums for k in s))
    labels = list(labels or [r.id for r in runs])
    rows = [{"": k, **{lab: _fmt(s.get(k, "")) for lab, s in zip(labels, sums)}} for k in keys]
    st.table(rows, hide_index=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def metric_select(key: str, default: str = "sqnr_db") -> str:
    from calib.drift_plots import METRIC_LABELS

    opts = ["sqnr_db", "local_sqnr_db", "cosine", "local_cosine", "relative_error", "local_relative_error",
            "max_abs_error", "mean_abs_error", "min_cosine"]
    # a value the page put in the session state wins (no default beside it: Streamlit warns about both)
    index = {} if key in st.session_state else {"index": opts.index(default)}
    return st.selectbox("metric", opts, key=key, format_func=lambda k: METRIC_LABELS[k], **index)


def store_jobs() -> None:
    """Every job of the run store (read from its progress files, so any session sees them), polled each second."""

    busy = any(j.get("finished") is None for j in actions.store_jobs())

    @st.fragment(run_every=1.0 if busy else 3.0)  # a job started in another session shows within 3 s
    def _poll() -> None:
        jobs = actions.store_jobs()
        running = [j for j in jobs if j.get("finished") is None]
        if not running:
            return
        st.markdown(f"**{len(running)} job(s) running in this store**")
        for j in running:
            total = f"/{j['total']}" if j.get("total") else ""
            frac = max(0.0, min(1.0, j["done"] / j["total"])) if j.get("total") else 0.0
            st.progress(frac, text=f"{j['label']}: {j['stage']} {j['done']}{total}")

    _poll()
