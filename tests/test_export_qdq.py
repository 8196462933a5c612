"""Q/DQ export: semantics against the numpy reference, per-channel axes, names, safety."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from reference.fakequant import (
    fake_quant,
    fake_quant_per_channel,
    fake_quant_weight_per_tensor,
    per_channel_scales,
)

from calib.calibrate.base import Ranges, TensorRange
from calib.errors import ConfigError, RangesError
from calib.export import export_qdq
from calib.model import model_from_proto

F = TensorProto.FLOAT


def make_model(nodes, inputs, outputs, inits=(), opset=17, meta=None):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    for k, v in (meta or {}).items():
        m.metadata_props.add(key=k, value=v)
    return m


def vi(name, shape):
    return helper.make_tensor_value_info(name, F, shape)


def ranges_for(amax: dict[str, float], method="minmax", sha=""):
    return Ranges(method, {t: TensorRange(a, method) for t, a in amax.items()}, sha)


def run(proto, feeds, optimize=False):
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def ort_minmax(proto, feeds) -> dict[str, float]:
    """amax of every float tensor by a plain ORT run exposing all of them (the oracle)."""
    p = onnx.ModelProto()
    p.CopyFrom(proto)
    names = [o for n in p.graph.node for o in n.output]
    del p.graph.output[:]
    p.graph.output.extend(onnx.ValueInfoProto(name=t) for t in names)
    outs = run(p, feeds)
    am = {k: float(np.abs(v).max()) for k, v in feeds.items()}
    am.update({t: max(float(np.abs(o).max()), 1e-3) for t, o in zip(names, outs)})
    return am


# ---------------------------------------------------------------- Q semantics


def test_quantize_linear_matches_numpy_round_half_even_and_saturation():
    # x -> MatMul(W) with W = identity: the output is exactly the fake-quantized input
    # times the fake-quantized identity (1.0 exactly after per-channel quantization).
    scale = 2.0 ** -4  # exact in float32, so k + 0.5 steps are exact ties
    amax = scale * 127
    ks = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, -3.51, 126.5, 127.5, 200.0, -127.5, -128.5, -300.0, 0.0])
    x = (ks * scale).astype(np.float32).reshape(1, -1)
    n = x.shape[1]
    w = np.eye(n, dtype=np.float32)
    proto = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                       [vi("x", [1, n])], [vi("y", [1, n])], [numpy_helper.from_array(w, "W")])
    q = export_qdq(model_from_proto(proto), ranges_for({"x": amax, "y": 1.0}))
    got = run(q.model, {"x": x})[0]
    want = fake_quant(x, scale) @ fake_quant_per_channel(w, 1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    # the ties really are resolved to even, and saturation really clips
    qx = np.round(want / scale).astype(int).ravel()
    assert list(qx[:6]) == [0, 2, 2, 0, -2, -2]
    assert list(qx[9:14]) == [127, 127, -128, -128, -128]


# ---------------------------------------------------------------- per-channel axes


def _spread_weight(shape, axis, rng):
    """A weight whose channels along ``axis`` differ by orders of magnitude (per-tensor would hurt)."""
    w = rng.standard_normal(shape).astype(np.float32)
    mags = np.logspace(-3, 1, shape[axis]).astype(np.float32)
    return w * mags.reshape([-1 if d == axis else 1 for d in range(len(shape))])


CASES = {
    # name: (node kwargs, input shape, weight shape, axis, output shape)
    "conv": (dict(op="Conv", attrs={"pads": [1, 1, 1, 1]}), [2, 3, 6, 6], [8, 3, 3, 3], 0, [2, 8, 6, 6]),
    "conv_transpose": (dict(op="ConvTranspose", attrs={"strides": [2, 2]}), [2, 4, 5, 5], [4, 6, 2, 2], 1,
                       [2, 6, 10, 10]),
    "conv_transpose_group2": (dict(op="ConvTranspose", attrs={"group": 2}), [1, 4, 5, 5], [4, 3, 3, 3], 1,
                              [1, 6, 7, 7]),
    "gemm_transB0": (dict(op="Gemm", attrs={"transB": 0}), [3, 5], [5, 7], 1, [3, 7]),
    "gemm_transB1": (dict(op="Gemm", attrs={"transB": 1}), [3, 5], [7, 5], 0, [3, 7]),
    "matmul_const_b": (dict(op="MatMul", attrs={}), [2, 3, 5], [5, 7], 1, [2, 3, 7]),
    "matmul_const_b_3d": (dict(op="MatMul", attrs={}), [4, 3, 5], [4, 5, 6], 2, [4, 3, 6]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_per_channel_axis_matches_numpy(case):
    spec, xshape, wshape, axis, yshape = CASES[case]
    rng = np.random.default_rng(7)
    w = _spread_weight(wshape, axis, rng)
    node = helper.make_node(spec["op"], ["x", "W"], ["y"], name="n0", **spec["attrs"])
    proto = make_model([node], [vi("x", xshape)], [vi("y", yshape)], [numpy_helper.from_array(w, "W")])
    x = rng.standard_normal(xshape).astype(np.float32)
    amax = float(np.abs(x).max())
    q = export_qdq(model_from_proto(proto), ranges_for({"x": amax, "y": 1.0}))

    dq = [n for n in q.model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "W_dq"]
    assert len(dq) == 1, f"{case}: weight W of node n0 has no DequantizeLinear"
    got_axis = next((a.i for a in dq[0].attribute if a.name == "axis"), 1)
    assert got_axis == axis, f"{case}: node n0 input 1 (W) quantized along axis {got_axis}, expected {axis}"
    scales = numpy_helper.to_array(next(t for t in q.model.graph.initializer if t.name == dq[0].input[1]))
    np.testing.assert_allclose(scales, per_channel_scales(w, axis), rtol=1e-6)

    ref = onnx.ModelProto()
    ref.CopyFrom(proto)
    ref.graph.initializer[0].CopyFrom(numpy_helper.from_array(fake_quant_per_channel(w, axis), "W"))
    want = run(ref, {"x": fake_quant(x, amax / 127)})[0]
    got = run(q.model, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    # per-tensor weights would give a visibly different result: the test can tell axes apart
    ref.graph.initializer[0].CopyFrom(numpy_helper.from_array(fake_quant_weight_per_tensor(w), "W"))
    per_tensor = run(ref, {"x": fake_quant(x, amax / 127)})[0]
    assert np.abs(per_tensor - want).max() > 10 * np.abs(got - want).max()


def test_zero_channel_gets_positive_scale_and_stays_zero():
    w = np.ones((4, 2, 1, 1), dtype=np.float32)
    w[2] = 0.0
    proto = make_model([helper.make_node("Conv", ["x", "W"], ["y"], name="c")], [vi("x", [1, 2, 3, 3])],
                       [vi("y", [1, 4, 3, 3])], [numpy_helper.from_array(w, "W")])
    q = export_qdq(model_from_proto(proto), ranges_for({"x": 1.0}))
    (wq,) = q.weights
    assert wq.zero_channels == 1 and np.all(wq.scales > 0)
    y = run(q.model, {"x": np.ones((1, 2, 3, 3), np.float32)})[0]
    assert np.all(y[0, 2] == 0) and np.allclose(y[0, 0], 2.0)


def test_shared_weight_used_by_two_nodes_and_a_float_node():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["a", "W"], ["b"], name="mm2"),
             helper.make_node("Add", ["b", "W"], ["y"], name="add")]
    proto = make_model(nodes, [vi("x", [4, 4])], [vi("y", [4, 4])], [numpy_helper.from_array(w, "W")])
    x = rng.standard_normal((4, 4)).astype(np.float32)
    am = ort_minmax(proto, {"x": x})
    q = export_qdq(model_from_proto(proto), ranges_for(am))
    assert len(q.weights) == 1 and q.weights[0].nodes == ["mm1", "mm2"]
    int8 = [t for t in q.model.graph.initializer if t.data_type == TensorProto.INT8 and list(t.dims) == [4, 4]]
    assert [t.name for t in int8] == ["W_int8"]
    assert "W" in {t.name for t in q.model.graph.initializer}, "the float Add still needs the float W"
    wf = fake_quant_per_channel(w, 1)
    a = fake_quant(x, am["x"] / 127) @ wf
    want = fake_quant(a, am["a"] / 127) @ wf + w
    np.testing.assert_allclose(run(q.model, {"x": x})[0], want, rtol=1e-5, atol=1e-5)


def test_names_shapes_metadata_kept_and_no_qdq_on_outputs():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((2, 4, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "W2"], ["y"], name="conv2")]
    proto = make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 2, 8, 8])],
                       [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
                       meta={"character": "0\n90"})
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    for placement in ("trt", "ort"):
        q = export_qdq(model_from_proto(proto), ranges_for(ort_minmax(proto, {"x": x})), placement=placement)
        onnx.checker.check_model(q.model, full_check=True)
        assert [(p.key, p.value) for p in q.model.metadata_props] == [("character", "0\n90")]
        assert [i.name for i in q.model.graph.input] == ["x"]
        assert q.model.graph.output[0] == proto.graph.output[0]
        produced = {o for n in q.model.graph.node for o in n.output}
        assert {"x", "c1", "r1", "y"} <= produced | {"x"}
        assert q.tensor_map == {"x": "x", "c1": "c1", "r1": "r1", "y": "y"}
        assert next(n for n in q.model.graph.node if "y" in n.output).op_type == "Conv", placement
        assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "y" for n in q.model.graph.node)
        y = run(q.model, {"x": x}, optimize=True)[0]
        ref = run(proto, {"x": x})[0]
        assert y.shape == ref.shape
        assert np.abs(y - ref).max() < 0.05 * np.abs(ref).max(), placement


def test_old_opset_model_is_upgraded_and_exports():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    proto = make_model([helper.make_node("Conv", ["x", "W"], ["y"], name="conv")], [vi("x", [1, 3, 5, 5])],
                       [vi("y", [1, 4, 3, 3])], [numpy_helper.from_array(w, "W")], opset=11)
    q = export_qdq(model_from_proto(proto), ranges_for({"x": 3.0}))
    assert next(o.version for o in q.model.opset_import if o.domain == "") >= 13
    dq = next(n for n in q.model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "W_dq")
    assert helper.get_attribute_value(dq.attribute[0]) == 0
    run(q.model, {"x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32)})


# ---------------------------------------------------------------- exclude and bad input


def _two_convs():
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1"),
             helper.make_node("Conv", ["c1", "W2"], ["y"], name="conv2")]
    return make_model(nodes, [vi("x", [1, 2, 4, 4])], [vi("y", [1, 2, 4, 4])],
                      [numpy_helper.from_array(rng.standard_normal((2, 2, 1, 1)).astype(np.float32), "W1"),
                       numpy_helper.from_array(rng.standard_normal((2, 2, 1, 1)).astype(np.float32), "W2")])


def test_exclude_by_node_name_keeps_node_float():
    q = export_qdq(model_from_proto(_two_convs()), ranges_for({"x": 1.0, "c1": 1.0}), exclude=["conv2"])
    conv2 = next(n for n in q.model.graph.node if n.name == "conv2")
    assert list(conv2.input) == ["c1", "W2"], f"excluded node conv2 reads {list(conv2.input)}"
    assert q.excluded == ["conv2"] and q.quantized_nodes == ["conv1"]


def test_exclude_by_tensor_keeps_tensor_and_its_producer_float():
    q = export_qdq(model_from_proto(_two_convs()), ranges_for({"x": 1.0, "c1": 1.0}), exclude=["c1"])
    nodes = {n.name: list(n.input) for n in q.model.graph.node}
    assert nodes["conv1"] == ["x", "W1"], f"producer conv1 of excluded tensor c1 reads {nodes['conv1']}"
    # issue 15 item 4: no half-quantized node; with its input c1 float, conv2's weight stays float too
    assert nodes["conv2"] == ["c1", "W2"], f"conv2 must read the unquantized c1 and W2: {nodes['conv2']}"
    assert "stays float" in q.skipped["W2"]
    assert q.activation_tensors == [] and q.excluded == ["conv1"]


def test_exclude_by_op_type_keeps_all_float():
    q = export_qdq(model_from_proto(_two_convs()), ranges_for({"x": 1.0, "c1": 1.0}), exclude=["Conv"])
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in q.model.graph.node)


def test_exclude_unknown_name_lists_close_matches():
    with pytest.raises(RangesError, match=r"exclude 'conv3'.*close matches: .*'conv1'"):
        export_qdq(model_from_proto(_two_convs()), ranges_for({"x": 1.0, "c1": 1.0}), exclude=["conv3"])


def test_missing_range_is_named():
    with pytest.raises(RangesError, match=r"no range for 1 tensor\(s\).*'c1'"):
        export_qdq(model_from_proto(_two_convs()), ranges_for({"x": 1.0}))


def test_ranges_from_another_model_are_refused():
    with pytest.raises(RangesError, match=r"do not exist in the model, e\.g\. 'other/a', 'other/b'"):
        export_qdq(model_from_proto(_two_convs()), ranges_for({"other/a": 1.0, "other/b": 1.0, "x": 1.0}))
    m = model_from_proto(_two_convs())
    with pytest.raises(RangesError, match="computed for another model"):
        export_qdq(m, ranges_for({"x": 1.0, "c1": 1.0}, sha="0" * 64))


def test_bad_options_are_config_errors():
    m = model_from_proto(_two_convs())
    with pytest.raises(ConfigError, match="placement"):
        export_qdq(m, ranges_for({"x": 1.0, "c1": 1.0}), placement="tensorrt")
    with pytest.raises(ConfigError, match="per_channel"):
        export_qdq(m, ranges_for({"x": 1.0, "c1": 1.0}), weights="per_row")


def test_model_proto_not_modified():
    m = model_from_proto(_two_convs())
    before = m.proto.SerializeToString()
    export_qdq(m, ranges_for({"x": 1.0, "c1": 1.0}), placement="ort")
    assert m.proto.SerializeToString() == before
