"""Layers: FP32-vs-INT8 drift through depth, and one layer's histogram, thresholds and errors."""

from __future__ import annotations

import streamlit as st

import state
import widgets
from calib import drift, drift_plots, drift_verdict
from calib.compare.report import ranking_metric
from calib.errors import CalibError

st.title("Layers: drift through depth")

run = state.pick_run("run", "layers_run")
if run is None:
    st.stop()

try:
    rng = state.ranges(run)
except CalibError as e:
    state.show_error(e)
    st.stop()

methods = state.compare_methods(run)
layers: dict[str, list[dict]] = {}
for m in methods:
    try:
        layers[m] = state.compare_report(run, m)["layers"]
    except CalibError as e:
        state.show_error(e, f"comparison of {m}")

# a run opens on local SQNR (each layer alone in INT8: where the error enters) when its comparison has it; the
# pick then stays the user's until another run is opened
if st.session_state.get("layers_metric_run") != run.id:
    st.session_state["layers_metric_run"] = run.id
    st.session_state["layers_metric"] = ranking_metric([r for rows in layers.values() for r in rows])
metric = widgets.metric_select("layers_metric")
n_worst = st.slider("worst layers to mark per method", 0, 20, 5, key="layers_worst")
if layers:
    worst = {m: [r["fp32_tensor"] for r in drift.worst_layers(rows, metric, n_worst)] for m, rows in layers.items()}
    sel_tensor = st.session_state.get("layers_tensor")
    st.plotly_chart(drift_plots.depth_figure(layers, metric, worst=worst, selected=sel_tensor),
                    width="stretch", key="layers_depth_fig")
    st.subheader("Worst layers")
    first = next(iter(layers))
    wrows = []
    for m, rows in layers.items():
        for r in drift.worst_layers(rows, metric, n_worst):
            wrows.append({"method": m, "node": r["node"], "op": r["op_type"], "depth": r["depth"],
                          "tensor": r["fp32_tensor"], metric: r.get(metric)})
    st.dataframe(wrows, hide_index=True, width="stretch")
    table = []
    for k, r in enumerate(layers[first]):
        row = {"tensor": r["fp32_tensor"], "node": r["node"], "op": r["op_type"], "depth": r["depth"]}
        for m, rows in layers.items():
            if k < len(rows) and rows[k]["fp32_tensor"] == r["fp32_tensor"]:
                row[f"{metric} ({m})"] = rows[k].get(metric)
        table.append(row)
else:
    st.warning(f"run {run.id} has no per-layer comparison (it had no evaluation data, or compare was off); "
               "showing calibrated ranges only.")
    table = [{"tensor": t, "node": "", "op": "", "depth": None} for t in next(iter(rng.values())).keys()]

st.subheader(f"All layers ({len(table)})")
found = widgets.search(table, "layers_search")
page, start = widgets.paged(found, "layers_page", per_page=50)
st.dataframe(page, hide_index=True, width="stretch")

if not found:
    st.info("no layer matches the search")
    st.stop()
worst_row, worst_why = (None, "")
if layers:
    primary = run.manifest.get("method", "")
    worst_row, worst_why = drift_verdict.worst_layer(layers.get(primary) or next(iter(layers.values())))
shown_rows = list(page)
if worst_row is not None and worst_row["fp32_tensor"] not in {r["tensor"] for r in shown_rows}:
    shown_rows.insert(0, next((r for r in table if r["tensor"] == worst_row["fp32_tensor"]), shown_rows[0]))
options = [r["tensor"] for r in shown_rows]
labels = {r["tensor"]: (f"{r['node']} ({r['op']}, depth {r['depth']})" if r["node"] else r["tensor"])
          for r in shown_rows}
pick_key = f"layers_tensor_pick_{run.id}"  # a run opens on its worst layer; the pick then stays the user's
if worst_row is not None and st.session_state.get(pick_key) not in options:
    st.session_state[pick_key] = worst_row["fp32_tensor"]
tensor = st.selectbox("layer", options, key=pick_key, format_func=lambda t: labels[t])
if worst_row is not None and tensor == worst_row["fp32_tensor"]:
    st.caption(f"opened on the worst layer: {worst_why}")
st.session_state["layers_tensor"] = tensor

st.subheader(f"Layer `{labels[tensor]}`")
node = next((r["node"] for r in page if r["tensor"] == tensor), "")
try:
    stats = state.stats(run)
    shown, why = state.histogram_tensors(run, node, tensor)
except CalibError as e:
    state.show_error(e)
    stats, shown, why = None, [], ""
if stats is not None and not shown:
    st.info(f"`{tensor}` is not a quantized tensor of this model; its histogram was not collected. {why}")
for t in shown:
    h = stats.tensors[t]
    amax = {m: r[t].amax for m, r in rng.items() if t in r}
    centres, counts, width = drift.histogram_view(h)
    st.markdown(f"`{t}`: {why}")
    st.plotly_chart(drift_plots.histogram_figure(
        centres, counts, width, amax, title=f"FP32 activations of {t} over {stats.n_samples} calibration samples"),
        width="stretch", key=f"layers_hist_fig_{t}")
    st.dataframe([{"method": m, "amax": r[t].amax, "scale (amax/127)": r[t].scale,
                   "clipped fraction (calibration data)": h.clipped_fraction(r[t].amax)}
                  for m, r in rng.items() if t in r], hide_index=True, width="stretch")
    st.caption(f"min {h.min:.5g}, max {h.max:.5g}, {h.n:,} values, bin width 2^{h.exp}")

if layers:
    st.markdown("**FP32 vs INT8 values** (computed on demand on a few evaluation samples with ONNX Runtime)")
    c1, c2 = st.columns(2)
    method = c1.selectbox("method", list(layers), key="layers_err_method")
    n = c2.number_input("evaluation samples", 1, 64, 4, key="layers_err_n")
    row = next((r for r in layers[method] if r["fp32_tensor"] == tensor), None)
    if row is None:
        st.info(f"`{tensor}` was not compared for {method}.")
    elif st.button("Compute FP32 vs INT8 for this layer", key="layers_err_go"):
        st.session_state["layers_err_for"] = (str(run.dir), method, tensor, int(n))
    want = st.session_state.get("layers_err_for")
    if row is not None and want == (str(run.dir), method, tensor, int(n)):
        try:
            vals = state.layer_values(run, method, tensor, row["qdq_tensor"], int(n))
            st.plotly_chart(drift_plots.error_figure(vals), width="stretch", key="layers_err_fig")
            st.caption(f"this layer over all evaluation samples ({method}): cosine {row['cosine']:.6f}, "
                       f"SQNR {row['sqnr_db']:.2f} dB, relative error {row['relative_error']:.4g}")
        except CalibError as e:
            state.show_error(e)
