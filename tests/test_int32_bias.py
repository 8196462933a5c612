"""Int32 biases for the ORT target: the spec evaluation then adds what ONNX Runtime's fused kernels add."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calib.calibrate import Ranges, TensorRange
from calib.compare.deployed import run_outputs
from calib.export.int32_bias import int32_biases
from calib.export.qdq import export_qdq
from calib.model import model_from_proto

CIN, COUT = 16, 24


def conv_model(seed: int = 3):
    """x -> 3x3 Conv (float bias) -> c -> 1x1 identity Conv -> y: the ort placement quantizes c, so ORT fuses
    DQ -> Conv -> Q into an integer kernel (weights 7-bit: no int16 pair can saturate on any x86 CPU)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.1, (COUT, CIN, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.3, COUT).astype(np.float32)
    eye = np.eye(COUT, dtype=np.float32).reshape(COUT, COUT, 1, 1)
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c", "I"], ["y"], name="identity")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, CIN, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, COUT, 12, 12])],
                          [numpy_helper.from_array(a, n) for a, n in ((w, "W"), (b, "B"), (eye, "I"))])
    model = model_from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9))
    x = rng.normal(0, 1, (8, CIN, 12, 12)).astype(np.float32)
    c = run_outputs(model.proto, [{"x": x}], "disable")[0]["y"]
    ranges = Ranges("minmax", {"x": TensorRange(float(np.abs(x).max()), "minmax"),
                               "c": TensorRange(float(np.abs(c).max()), "minmax"),
                               "y": TensorRange(float(np.abs(c).max()), "minmax")})
    return model, ranges, x, b


def _fused_vs_spec(proto, x):
    a = run_outputs(proto, [{"x": x}], "all")[0]["y"]
    s = run_outputs(proto, [{"x": x}], "disable")[0]["y"]
    return a, s


def test_float_bias_makes_the_fused_kernel_differ_and_int32_bias_makes_it_exact():
    model, ranges, x, b = conv_model()
    q = export_qdq(model, ranges, placement="ort", weight_bits={"conv": 7, "identity": 7}).model
    a, s = _fused_vs_spec(q, x)
    assert (a != s).any()  # ONNX Runtime rounds the float bias to int32 itself; the spec adds it in float
    q32, changed = int32_biases(q)
    onnx.checker.check_model(q32)
    assert changed == ["conv"]  # the identity conv has no bias
    a32, s32 = _fused_vs_spec(q32, x)
    np.testing.assert_array_equal(a32, a)  # the fused kernel made these very int32 values of the float bias
    # the spec evaluation now adds them too: what differs is left to its own float32 accumulation (ties only)
    assert (a32 != s32).mean() < (a != s).mean() / 5
    # the bias written: round(b / (s_x s_w)) behind a DQ with that scale, zero point 0
    i = {t.name: numpy_helper.to_array(t) for t in q32.graph.initializer}
    sb = (i["x_scale"] * i["W_w_scale"]).astype(np.float32)
    np.testing.assert_array_equal(i["B_b_scale"], sb)
    np.testing.assert_array_equal(i["B_int32"], np.rint(b.astype(np.float64) / sb).astype(np.int32))
    assert i["B_int32"].dtype == np.int32 and not i["B_b_zero_point"].any()
    dq = next(n for n in q32.graph.node if n.output[0] == "B")
    assert dq.op_type == "DequantizeLinear" and dq.input[0] == "B_int32"
    # and the spec result moves only by the bias rounding: at most one output step, on few elements
    step = float(i["c_scale"])
    assert np.abs(s32 - s).max() <= step * 1.001 and (s32 != s).mean() < 0.05


def test_biases_that_are_not_fused_stay_float():
    model, ranges, _, _ = conv_model()
    # the conv kept float: its inputs do not come from DQ, so no integer kernel and nothing to change
    same, changed = int32_biases(export_qdq(model, ranges, placement="ort", exclude=["conv"]).model)
    assert changed == [] and "B" in {t.name for t in same.graph.initializer}


def test_quantize_for_ort_writes_int32_biases_and_deployed_equals_spec(tmp_path):
    import json

    from calib.pipeline import quantize

    model, _, x, _ = conv_model()
    onnx.save(model.proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.concatenate([x, np.random.default_rng(9).normal(0, 1, x.shape).astype(np.float32)]))
    quantize(tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "q.onnx", method="minmax", placement="ort",
             report=tmp_path / "s.json", auto_transforms=[], deploy_cpu="no-vnni")
    written = onnx.load(tmp_path / "q.onnx")
    ints = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    assert ints["B_int32"].dtype == np.int32
    a, s = _fused_vs_spec(written, x)
    assert (a != s).mean() < 2e-4
    doc = json.loads((tmp_path / "s.json").read_text())["deployed"]
    assert max(o["rel_l2"] for o in doc["after"]["outputs"]) < 1e-3
    # the TensorRT target keeps float biases
    quantize(tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "t.onnx", method="minmax", auto_transforms=[])
    assert "B" in {t.name for t in onnx.load(tmp_path / "t.onnx").graph.initializer}
