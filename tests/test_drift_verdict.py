"""worst_layer, drift_verdict and range_setters against hand-made rows and ONNX Runtime run sample by sample."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from calib.data import ListSource, Sample
from calib.drift_verdict import OUTLIER_RATIO, drift_verdict, range_setters, worst_layer
from calib.model import model_from_proto
from tests.models import cnn_residual


def test_worst_layer_prefers_the_local_error_and_says_which():
    rows = [{"fp32_tensor": "a", "sqnr_db": 5.0, "local_sqnr_db": 30.0},
            {"fp32_tensor": "b", "sqnr_db": 9.0, "local_sqnr_db": 12.0}, {"fp32_tensor": "c", "sqnr_db": float("nan")}]
    row, why = worst_layer(rows)
    assert row["fp32_tensor"] == "b" and "local_sqnr_db = 12.00" in why and "where the error enters" in why
    row, why = worst_layer([{k: v for k, v in r.items() if k != "local_sqnr_db"} for r in rows])
    assert row["fp32_tensor"] == "a" and "accumulated" in why
    assert worst_layer([])[0] is None


def test_drift_verdict_levels_and_numbers():
    rows = [{"tensor": f"t{k}", "js_distance": 0.02, "clip_rate:entropy": 0.0} for k in range(10)]
    nov = [{"id": f"e{k}", "score": 1.0} for k in range(20)]
    v = drift_verdict(rows, nov, "entropy")
    assert v.level == "ok" and "0 of 10 tensors" in v.text and "0 of 20 evaluation samples" in v.text
    rows[3]["clip_rate:entropy"] = 0.001
    nov[0]["score"] = 4.0
    v = drift_verdict(rows, nov, "entropy")
    assert v.level == "watch" and "1 of 10 tensors" in v.text and "worst 0.100% at `t3`" in v.text
    assert "1 of 20 evaluation samples are novel" in v.text
    rows[4]["clip_rate:entropy"] = 0.05
    v = drift_verdict(rows, nov, "entropy")
    assert v.level == "act" and "2 of 10 tensors" in v.text and "worst 5.000% at `t4`" in v.text


def _per_sample_max(proto: onnx.ModelProto, tensors, xs) -> np.ndarray:
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    del m.graph.output[:]
    m.graph.output.extend([helper.make_empty_tensor_value_info(t) for t in tensors])
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.array([[float(np.abs(v).max()) for v in s.run(tensors, {"x": x[None]})] for x in xs])


def test_range_setters_match_ort_sample_by_sample():
    proto = cnn_residual(size=12)
    model = model_from_proto(proto)
    xs = np.random.default_rng(1).normal(0, 1, (9, 3, 12, 12)).astype(np.float32)
    xs[4] *= 5  # an outlier: it sets most maxima by far
    src = ListSource([Sample(f"s{k}", {"x": x}) for k, x in enumerate(xs)])
    tensors = [t for t in model.activation_tensors() if t != "x"]
    rs = range_setters(model, src, tensors, batch_size=4)
    ref = _per_sample_max(proto, tensors, xs)
    np.testing.assert_allclose(rs.max_abs, ref, rtol=1e-6)
    assert rs.setters() == {t: f"s{int(k)}" for t, k in zip(tensors, ref.argmax(0))}
    rows = {r["id"]: r for r in rs.per_sample()}
    srt = np.sort(ref, 0)
    want_out = int(((ref.argmax(0) == 4) & (srt[-1] > OUTLIER_RATIO * srt[-2])).sum())
    assert rows["s4"]["ranges_set"] == int((ref.argmax(0) == 4).sum()) and rows["s4"]["outlier_ranges"] == want_out
    assert rows["s4"]["outlier"] and want_out > 0
    assert sum(r["ranges_set"] for r in rows.values()) == len(tensors)
