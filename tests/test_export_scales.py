"""Scale report: numbers checked against the exported model and plain numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from calib.calibrate.base import Ranges, TensorRange
from calib.errors import RangesError
from calib.export import export_qdq, scale_report, write_scale_report
from calib.model import model_from_proto


class _H:
    def __init__(self, n, n_nonfinite):
        self.n, self.n_nonfinite = n, n_nonfinite


class _Stats:
    def __init__(self, tensors):
        self.tensors = tensors


def _setup():
    w = np.arange(24, dtype=np.float32).reshape(4, 6) - 3.0
    w[1] = 0.0
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Concat", ["r", "r2"], ["cat"], name="cat", axis=1),
             helper.make_node("MatMul", ["cat", "W2"], ["y"], name="mm2"),
             helper.make_node("MatMul", ["r2", "W3"], ["y2"], name="mm3")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
                                       helper.make_tensor_value_info("r2", TensorProto.FLOAT, [2, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
                           helper.make_tensor_value_info("y2", TensorProto.FLOAT, [2, 3])],
                          [numpy_helper.from_array(w.T.copy(), "W"),
                           numpy_helper.from_array(np.ones((12, 3), np.float32), "W2"),
                           numpy_helper.from_array(np.ones((6, 3), np.float32), "W3")])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    names = ["x", "r2", "h", "r", "cat"]
    mk = lambda m, a: Ranges(m, {t: TensorRange(a * (i + 1), m) for i, t in enumerate(names)})  # noqa: E731
    return model_from_proto(proto), {"entropy": mk("entropy", 1.0), "minmax": mk("minmax", 2.0)}


def test_report_numbers(tmp_path):
    model, ranges = _setup()
    q = export_qdq(model, ranges["entropy"], exclude=[])
    stats = _Stats({"x": _H(8, 0), "cat": _H(24, 2)})
    doc = scale_report(q, ranges, chosen="entropy", stats=stats)
    by_t = {a["tensor"]: a for a in doc["activations"]}
    assert list(by_t) == q.activation_tensors
    assert by_t["x"] == {"tensor": "x", "method": "entropy", "amax": 1.0, "scale": float(np.float32(1 / 127)),
                         "calibrated_amax": 1.0, "degenerate": None, "shared_with": [],
                         "rules": ["quantize_weighted_op_inputs"], "n": 8, "n_nonfinite": 0,
                         "other_amax": {"minmax": 2.0}}
    assert by_t["cat"]["n_nonfinite"] == 2 and by_t["cat"]["calibrated_amax"] == 5.0
    w = next(x for x in doc["weights"] if x["initializer"] == "W")
    col_amax = np.abs(np.arange(24, dtype=np.float32).reshape(4, 6) - 3.0).max(axis=0)
    assert w["axis"] == 1 and w["channels"] == 4 and w["zero_channels"] == 1 and w["nodes"] == ["mm"]
    # W is stored transposed ([K=6, N=4]); channel 1 is all zero and gets scale 1.0
    s = np.array([np.abs(np.arange(24, dtype=np.float32).reshape(4, 6)[c] - 3.0).max() / 127 for c in range(4)])
    s[1] = 1.0
    assert w["scale_min"] == pytest.approx(float(s.min()), rel=1e-6)
    assert w["scale_median"] == pytest.approx(float(np.median(s.astype(np.float32))), rel=1e-6)
    assert w["scale_max"] == pytest.approx(1.0)
    assert col_amax.shape == (6,)
    p = write_scale_report(tmp_path / "scales.json", doc)
    assert json.loads(p.read_text()) == doc


def test_report_shows_concat_sharing_and_skips():
    model, ranges = _setup()
    q = export_qdq(model, ranges["entropy"], flagged={"r2": "3 of 12 values were NaN/inf"})
    doc = scale_report(q, ranges, chosen="entropy")
    # issue 15 item 4: the MatMul reading the flagged r2 keeps its weight W3 float too, and says so
    assert {s["tensor"]: s["reason"] for s in doc["skipped"]} == {
        "r2": "flagged: 3 of 12 values were NaN/inf",
        "W3": "weight of 'mm3': its input 'r2' stays float, so the weight does too (no half-int8 node)"}
    q2 = export_qdq(model, ranges["entropy"])
    doc2 = scale_report(q2, ranges, chosen="entropy")
    by_t = {a["tensor"]: a for a in doc2["activations"]}
    assert by_t["cat"]["shared_with"] == ["r2"] and by_t["r2"]["amax"] == by_t["cat"]["amax"] == 5.0
    assert by_t["r2"]["calibrated_amax"] == 2.0 and "r" not in by_t


def test_report_needs_the_chosen_method():
    model, ranges = _setup()
    q = export_qdq(model, ranges["entropy"])
    with pytest.raises(RangesError, match="say which"):
        scale_report(q, ranges)
    with pytest.raises(RangesError, match="'mse' is not among"):
        scale_report(q, ranges, chosen="mse")
