"""Local error (a quantized node run in INT8 on FP32 inputs) beside the accumulated error in compare."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.utils
import onnxruntime as ort
import pytest
from compare_graphs import calib_qdq, cnn_data, plant_bad_scale, small_cnn

from calib.compare import compare
from calib.compare.html import render_html
from calib.compare.local import local_errors
from calib.compare.mapping import map_models
from calib.model import model_from_proto


@pytest.fixture(scope="module")
def setup():
    m = model_from_proto(small_cnn())
    src = cnn_data(32)
    _, _, q = calib_qdq(m, src)
    plant_bad_scale(q.model, "conv2", factor=40.0)
    return m, src, q


def _run(proto, feeds, outputs):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(outputs,
                                                                                                        feeds)


def reference_local_sqnr_db(fp32: onnx.ModelProto, qdq: onnx.ModelProto, src, node_input: str, node_output: str,
                            tmp_path) -> float:
    """Cut the Q/DQ model from ``node_input`` to ``node_output`` (onnx.utils.extract_model), feed it the FP32
    tensor, compare with the FP32 output in numpy."""
    x = np.stack([s.feeds["x"] for s in src])
    fp32_in, fp32_out = _run(_exposed(fp32, [node_input, node_output]), {"x": x}, [node_input, node_output])
    onnx.save(qdq, tmp_path / "q.onnx")
    onnx.utils.extract_model(str(tmp_path / "q.onnx"), str(tmp_path / "cut.onnx"), [node_input], [node_output])
    got = _run(onnx.load(tmp_path / "cut.onnx"), {node_input: fp32_in}, [node_output])[0]
    a, e = fp32_out.astype(np.float64), got.astype(np.float64) - fp32_out
    return float(10 * np.log10((a ** 2).sum() / (e ** 2).sum()))


def _exposed(proto, names):
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    for n in names:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    return m


def test_local_error_matches_the_cut_out_node(setup, tmp_path):
    m, src, q = setup
    rows = {r["fp32_tensor"]: r for r in compare(m, q, src, batch_size=8).layers}
    for node_in, node_out in (("r1", "c2"), ("r2", "c3")):
        ref = reference_local_sqnr_db(m.proto, q.model, src, node_in, node_out, tmp_path)
        assert rows[node_out]["local_sqnr_db"] == pytest.approx(ref, abs=1e-3)


def test_local_error_points_at_where_error_enters(setup):
    m, src, q = setup
    rows = {r["node"]: r for r in compare(m, q, src, batch_size=8).layers}
    # conv2 has the bad scale: its local error is the worst; conv3 inherits an accumulated error but is fine locally
    local = {n: r["local_sqnr_db"] for n, r in rows.items() if r["local_sqnr_db"] is not None}
    assert min(local, key=local.get) == "conv2"
    assert rows["conv3"]["sqnr_db"] < rows["conv3"]["local_sqnr_db"] - 10
    assert rows["relu1"]["local_sqnr_db"] is None  # reads no Q/DQ input


def test_local_errors_alone_and_in_the_html(setup):
    m, src, q = setup
    tm = map_models(m, model_from_proto(q.model))
    lm = local_errors(m, tm, src, batch_size=8, limit=8)
    by = lm.by_node()
    assert set(by) == set(tm.quantized) and not lm.skipped
    assert min(by, key=lambda n: by[n]["sqnr_db"]) == "conv2"
    assert next(iter(lm.acc.values())).n_samples == 8
    assert "local SQNR dB" in render_html(compare(m, q, src, batch_size=8))


def test_the_report_ranks_worst_layers_by_where_error_enters(setup):
    import re

    from calib import plots

    m, src, q = setup
    report = compare(m, q, src, batch_size=8)
    rows = {r["node"]: r for r in report.layers}
    # conv3's accumulated error is worse than conv2's local one would suggest; ranked by local error conv2 leads
    fig = plots.worst_layers(report.layers, 20, "local_sqnr_db")
    local_bar, acc_bar = fig.data
    assert local_bar.y[-1] == "conv2 (Conv)" and "where the error enters" in fig.layout.title.text
    assert "relu1 (Relu)" not in local_bar.y  # no local error (reads no Q/DQ input): left out, not drawn as 0
    assert list(acc_bar.x) == pytest.approx([rows[n.split(" ")[0]]["sqnr_db"] for n in acc_bar.y])
    page = render_html(report)
    assert "Local error vs depth" in page
    marked = re.findall(r"<tr class='bad'><td class='l'>([^<]+)</td>", page)
    assert "conv2" in marked and len(marked) == min(5, sum(r["local_sqnr_db"] is not None for r in report.layers))
