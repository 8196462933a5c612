"""Placement and scale hygiene (issue 15 item 4, issue 16 item 4): no half-quantized weighted node, one test
per rule that drops an activation edge; ``ort`` quantizes after the activation that follows a conv; weight
scales keep an int32 bias in range; activation scales never go below the smallest normal float32."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from calib.calibrate.base import Ranges, TensorRange
from calib.export import export_qdq
from calib.model import model_from_proto

F = TensorProto.FLOAT
RNG = np.random.default_rng(5)
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _model(nodes, inputs, outputs, inits):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return model_from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10))


def _w(name, shape, scale=1.0):
    return numpy_helper.from_array((scale * RNG.standard_normal(shape)).astype(np.float32), name)


def _ranges(model, special=None, amax=1.0):
    names = [i.name for i in model.graph.input] + [o for n in model.graph.node for o in n.output]
    t = {n: TensorRange(amax, "minmax") for n in names}
    t.update({k: TensorRange(v, "minmax") for k, v in (special or {}).items()})
    return Ranges("minmax", t, model.sha256)


def half_quantized(q) -> list[str]:
    """Weighted nodes that read some but not all of their activation and weight inputs through DQ."""
    g = q.model.graph
    prod = {o: n for n in g.node for o in n.output}
    inits = {t.name for t in g.initializer}
    bad = []
    for n in g.node:
        if n.op_type not in WEIGHTED:
            continue
        reads = [prod[t].op_type == "DequantizeLinear" if t in prod else False
                 for t in n.input[:2] if t and (t in prod or t in inits or t in {i.name for i in g.input})]
        if any(reads) and not all(reads):
            bad.append(n.name)
    return bad


def _two_convs():
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1"),
             helper.make_node("Conv", ["c1", "W2"], ["y"], name="conv2")]
    return _model(nodes, [helper.make_tensor_value_info("x", F, [1, 2, 4, 4])],
                  [helper.make_tensor_value_info("y", F, [1, 2, 4, 4])], [_w("W1", [2, 2, 1, 1]), _w("W2", [2, 2, 1, 1])])


def test_drop_excluded_tensor_keeps_the_weight_float_too():
    m = _two_convs()
    q = export_qdq(m, _ranges(m), exclude=["c1"])
    assert half_quantized(q) == []
    assert "stays float" in q.skipped["W2"]


def test_skip_huge_tensors_keeps_the_weight_float_too():
    m = _two_convs()
    q = export_qdq(m, _ranges(m, special={"c1": 1e35}))
    assert half_quantized(q) == [] and "mask-like" in q.skipped["c1"] and "'c1'" in q.skipped["W2"]
    q = export_qdq(m, _ranges(m), flagged={"c1": "3 of 8 values were NaN/inf"})
    assert half_quantized(q) == [] and q.skipped["c1"].startswith("flagged") and "W2" in q.skipped


def test_ort_graph_output_read_by_a_conv_keeps_that_conv_whole():
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1"),
             helper.make_node("Conv", ["c1", "W2"], ["y"], name="conv2")]
    m = _model(nodes, [helper.make_tensor_value_info("x", F, [1, 2, 4, 4])],
               [helper.make_tensor_value_info("c1", F, [1, 2, 4, 4]), helper.make_tensor_value_info("y", F, [1, 2, 4, 4])],
               [_w("W1", [2, 2, 1, 1]), _w("W2", [2, 2, 1, 1])])
    q = export_qdq(m, _ranges(m), placement="ort")
    assert half_quantized(q) == [] and "c1" not in q.activation_tensors and "W2" in q.skipped


def test_computed_weight_keeps_the_activation_float_too():
    nodes = [helper.make_node("Transpose", ["Wt"], ["Wc"], name="t", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "Wc"], ["y"], name="mm")]
    m = _model(nodes, [helper.make_tensor_value_info("x", F, [2, 3])], [helper.make_tensor_value_info("y", F, [2, 4])],
               [_w("Wt", [4, 3])])
    q = export_qdq(m, _ranges(m))
    assert half_quantized(q) == [] and "x" not in q.activation_tensors
    assert "Wc" in q.skipped and "'Wc' of 'mm' stays float" in q.skipped["x"]


def test_ort_quantizes_after_the_relu_that_follows_a_conv():
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c"], name="conv1"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "W2"], ["y"], name="conv2")]
    m = _model(nodes, [helper.make_tensor_value_info("x", F, [1, 2, 4, 4])],
               [helper.make_tensor_value_info("y", F, [1, 2, 4, 4])], [_w("W1", [2, 2, 1, 1]), _w("W2", [2, 2, 1, 1])])
    q = export_qdq(m, _ranges(m, special={"c": 8.0, "r": 2.0}), placement="ort")
    assert "c" not in q.activation_tensors and "r" in q.activation_tensors
    assert "Relu 'relu'" in q.skipped["c"] and q.amax["r"] == 2.0
    relu = next(n for n in q.model.graph.node if n.name == "relu")
    assert relu.input[0] == "c", "the Relu reads the float conv output, not a Q/DQ copy with the pre-activation range"
    assert half_quantized(q) == []
    trt = export_qdq(m, _ranges(m, special={"c": 8.0, "r": 2.0}), placement="trt")
    assert "r" in trt.activation_tensors  # TensorRT's placement is unchanged (it fuses Conv+Relu itself)


def test_dead_channel_weight_scale_keeps_the_int32_bias_in_range():
    w = RNG.standard_normal((3, 2, 1, 1)).astype(np.float32)
    w[1] = 1e-30  # a dead channel: amax 1e-30 would give scale 8e-33
    b = np.array([0.5, 5.0, -0.25], np.float32)
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv")]
    m = _model(nodes, [helper.make_tensor_value_info("x", F, [1, 2, 4, 4])],
               [helper.make_tensor_value_info("y", F, [1, 3, 4, 4])],
               [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    q = export_qdq(m, _ranges(m, amax=1.0))
    (wq,) = q.weights
    s_w = np.asarray(wq.scales, np.float64)
    s_x = float(np.float32(1.0 / 127))
    assert np.all(np.abs(b.astype(np.float64)) / (s_x * s_w) < 2**31)
    amax = np.abs(w.astype(np.float64)).max(axis=(1, 2, 3))
    np.testing.assert_array_equal(wq.scales[[0, 2]], (amax[[0, 2]] / 127).astype(np.float32))  # live: unchanged
    assert s_w[1] > 1e-8
    x = RNG.standard_normal((1, 2, 4, 4)).astype(np.float32)
    y = ort.InferenceSession(q.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y[0, 1], 5.0, atol=1e-5)  # the dead channel outputs its bias


def test_activation_scale_never_below_the_smallest_normal_float32():
    m = _two_convs()
    q = export_qdq(m, _ranges(m, special={"x": 1e-42}))
    inits = {t.name: numpy_helper.to_array(t) for t in q.model.graph.initializer}
    dq = next(n for n in q.model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("x"))
    assert float(inits[dq.input[1]]) == np.finfo(np.float32).tiny


def test_dead_channel_bias_survives_onnx_runtimes_float32_int32_conversion():
    """ORT target, a dead channel fused into an integer kernel: ONNX Runtime turns the float bias into int32
    in float32 (b / (s_x s_w)); at the old bound 2^31 - 1 that rounded to 2^31 and wrapped negative (the
    ReLU then gave 0 instead of the bias). The floor keeps it below 2^30: deployed equals spec."""
    from calib.compare.deployed import run_outputs

    w = RNG.standard_normal((3, 2, 1, 1)).astype(np.float32)
    w[1] = 1e-9  # dead
    b = np.array([0.5, 0.95, -0.25], np.float32)
    eye = np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1)
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "I"], ["y"], name="identity")]
    m = _model(nodes, [helper.make_tensor_value_info("x", F, [1, 2, 4, 4])],
               [helper.make_tensor_value_info("y", F, [1, 3, 4, 4])],
               [numpy_helper.from_array(a, n) for a, n in ((w, "W"), (b, "B"), (eye, "I"))])
    q = export_qdq(m, _ranges(m, amax=2.0), placement="ort")
    (wq,) = [x for x in q.weights if x.initializer == "W"]
    s_x = float(np.float32(2.0 / 127))
    ratio = np.float32(b[1]) / (np.float32(s_x) * np.float32(wq.scales[1]))  # in float32, as ONNX Runtime does
    assert ratio < 2**31 and ratio <= 2**30 * 1.001
    x = RNG.standard_normal((1, 2, 4, 4)).astype(np.float32)
    dep, spec = run_outputs(q.model, [{"x": x}], "all")[0]["y"], run_outputs(q.model, [{"x": x}], "disable")[0]["y"]
    np.testing.assert_allclose(dep[:, 1], 0.95, atol=2.0 / 127)  # the dead channel outputs its bias, deployed too
    np.testing.assert_allclose(dep, spec, atol=2.0 / 127 * 1.01)
