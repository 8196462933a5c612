"""Compare runs: ranges, excluded nodes, metrics and per-layer curves of two runs."""

from __future__ import annotations

import streamlit as st

import state
import widgets
from calib import drift, drift_plots
from calib.errors import CalibError

st.title("Compare runs")

c1, c2 = st.columns(2)
with c1:  # A = the older run, B = the newer (the store lists newest first): changes read "B − A", new minus old
    run_a = state.pick_run("run A (before)", "cmp_a", default_index=1)
with c2:
    run_b = state.pick_run("run B (after)", "cmp_b", default_index=0)
if run_a is None or run_b is None:
    st.stop()
if run_a.dir == run_b.dir:
    st.info("Pick two different runs (select two on the Runs page, or change run B).")

st.subheader("Runs")
widgets.side_by_side([run_a, run_b], [f"A: {run_a.id}", f"B: {run_b.id}"])

st.subheader("Per-layer metrics")
metric = widgets.metric_select("cmp_metric")
curves = {}
mcols = st.columns(2)
for col, (label, r) in zip(mcols, (("A", run_a), ("B", run_b))):
    meths = state.compare_methods(r)
    if not meths:
        col.caption(f"run {label} has no per-layer comparison")
        continue
    primary = r.manifest.get("method", "")
    meth = col.selectbox(f"method of run {label}", meths, index=meths.index(primary) if primary in meths else 0,
                        key=f"cmp_meth_{label}")
    try:
        curves[f"{label}: {meth}"] = state.compare_report(r, meth)["layers"]
    except CalibError as e:
        state.show_error(e)
if curves:
    st.plotly_chart(drift_plots.overlay_figure(curves, metric), width="stretch", key="cmp_overlay")
if len(curves) == 2:
    (la, rows_a), (lb, rows_b) = curves.items()
    st.plotly_chart(drift_plots.delta_figure(drift.layer_deltas(rows_a, rows_b, metric), metric, ("A", "B")),
                    width="stretch", key="cmp_delta")

st.subheader("Calibrated ranges")
try:
    ra, rb = state.ranges(run_a), state.ranges(run_b)
except CalibError as e:
    state.show_error(e)
    st.stop()
common = [m for m in ra if m in rb]
if not common:
    st.warning("the two runs share no calibration method")
    st.stop()
method = st.selectbox("method", common, key="cmp_range_method")
st.plotly_chart(drift_plots.ranges_figure({t: r.amax for t, r in ra[method].items()},
                                          {t: r.amax for t, r in rb[method].items()}, ("A", "B")),
                width="stretch", key="cmp_ranges_fig")
rows = drift.range_rows(ra[method], rb[method])
order = st.radio("order", ["model order", "largest change first"], horizontal=True, key="cmp_order")
if order != "model order":
    rows = sorted(rows, key=lambda r: r["change"] if r["change"] == r["change"] else -1.0, reverse=True)
found = widgets.search(rows, "cmp_search")
page, _ = widgets.paged(found, "cmp_page", per_page=50)
st.dataframe([{"tensor": r["tensor"], "amax A": r["amax_a"], "amax B": r["amax_b"], "B / A": r["ratio_b_a"]}
              for r in page], hide_index=True, width="stretch",
             column_config={"B / A": st.column_config.NumberColumn(format="%.4f")})
