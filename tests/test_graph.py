"""calib.graph against ONNX Runtime and obvious references; flagged_tensors (the NaN/inf policy)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from calib.export import flagged_tensors
from calib.graph import QDQ_OPS, constant_tensors, consumers, fold_bn, node_depth, producers
from calib.stats import ActivationStats, TensorHistogram


def _conv_bn(rng, with_bias: bool) -> onnx.ModelProto:
    c_in, c_out = 3, 4
    inits = [numpy_helper.from_array(rng.normal(size=(c_out, c_in, 3, 3)).astype(np.float32), "W")]
    conv_in = ["x", "W"]
    if with_bias:
        inits.append(numpy_helper.from_array(rng.normal(size=c_out).astype(np.float32), "B"))
        conv_in.append("B")
    for name, v in (("g", rng.uniform(0.5, 2, c_out)), ("be", rng.normal(size=c_out)),
                    ("mu", rng.normal(size=c_out)), ("var", rng.uniform(0.1, 3, c_out))):
        inits.append(numpy_helper.from_array(v.astype(np.float32), name))
    nodes = [helper.make_node("Conv", conv_in, ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["y"], name="bn", epsilon=1e-3)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c_in, 5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, c_out, 5, 5])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def test_fold_bn_matches_onnx_runtime():
    """A Conv with the folded weight and bias computes what Conv -> BatchNormalization computes on ORT."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 5, 5)).astype(np.float32)
    for with_bias in (False, True):
        m = _conv_bn(rng, with_bias)
        w = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        wf, bf = fold_bn(w["W"], w.get("B"), w["g"], w["be"], w["mu"], w["var"], 1e-3)
        assert wf.dtype == np.float32 and bf.dtype == np.float32
        g = helper.make_graph([helper.make_node("Conv", ["x", "Wf", "Bf"], ["y"], pads=[1, 1, 1, 1])], "f",
                              list(m.graph.input), list(m.graph.output),
                              [numpy_helper.from_array(wf, "Wf"), numpy_helper.from_array(bf, "Bf")])
        folded = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        np.testing.assert_allclose(_run(folded, x), _run(m, x), rtol=1e-4, atol=1e-4)


def test_indexes_depth_and_constants():
    c = numpy_helper.from_array(np.array([1.0], np.float32), "c")
    nodes = [helper.make_node("Add", ["c", "c"], ["c2"], name="fold"),      # constant: only initializers
             helper.make_node("Constant", [], ["k"], name="k", value_float=2.0),
             helper.make_node("Mul", ["x", "c2"], ["a"], name="mul"),
             helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [c])
    assert constant_tensors(g) == {"c", "c2"}
    assert constant_tensors(g, constant_nodes=True) == {"c", "c2", "k"}
    assert producers(g)["b"].name == "relu"
    assert [n.name for n in consumers(g)["a"]] == ["relu", "add"]
    assert [n.name for n in consumers(g)["c"]] == ["fold", "fold"]
    assert node_depth(g) == {"fold": 1, "k": 1, "mul": 2, "relu": 3, "add": 4}
    assert QDQ_OPS == {"QuantizeLinear", "DequantizeLinear"}


def test_flagged_tensors_are_those_with_non_finite_values():
    ok, bad = TensorHistogram(), TensorHistogram()
    ok.update(np.array([1.0, -2.0], np.float32))
    bad.update(np.array([1.0, np.nan, np.inf, 3.0], np.float32))
    st = ActivationStats({"ok": ok, "bad": bad}, "sha")
    assert flagged_tensors(st) == {"bad": "2 of 4 values were NaN/inf"}
    assert flagged_tensors(None) == {}
