"""The ORT target's float regions (calib.pipeline.float_regions): an elementwise LayerNorm written as
E[x²] − E[x]² loses its variance to int8 cancellation; auto leaves that region float where the selection
samples show a clear gain, and a benign elementwise op stays int8. Figures on held-out samples, against ONNX
Runtime's own outputs of the written models."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from calib.model import model_from_proto
from calib.pipeline import quantize
from calib.pipeline.float_regions import NAME, regions

F = TensorProto.FLOAT


def _mlp(middle: list, mids: list[str], inits: list, name: str) -> onnx.ModelProto:
    """x -> MatMul W1 -> + 10 (a large mean) -> h -> ``middle`` -> mids[-1] -> MatMul W2 -> y."""
    rng = np.random.default_rng(0)
    w = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
         for n, s in (("W1", (16, 32)), ("W2", (32, 8)))]
    b = numpy_helper.from_array(np.full(32, 10.0, np.float32), "b10")
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "b10"], ["h"], name="bias"), *middle,
             helper.make_node("MatMul", [mids[-1], "W2"], ["y"], name="mm2")]
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", F, ["N", 16])],
                          [helper.make_tensor_value_info("y", F, ["N", 8])], w + [b] + inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def layernorm_model() -> onnx.ModelProto:
    eps = numpy_helper.from_array(np.array(1e-5, np.float32), "eps")
    n = helper.make_node
    middle = [n("ReduceMean", ["h"], ["mean"], name="mean", axes=[-1]),
              n("Mul", ["h", "h"], ["sq"], name="square"),
              n("ReduceMean", ["sq"], ["msq"], name="mean_sq", axes=[-1]),
              n("Mul", ["mean", "mean"], ["m2"], name="mean_2"),
              n("Sub", ["msq", "m2"], ["var"], name="var"),
              n("Add", ["var", "eps"], ["ve"], name="var_eps"),
              n("Sqrt", ["ve"], ["sd"], name="sd"),
              n("Sub", ["h", "mean"], ["xc"], name="centre"),
              n("Div", ["xc", "sd"], ["ln"], name="norm")]
    return _mlp(middle, ["ln"], [eps], "ln_mlp")


def benign_model() -> onnx.ModelProto:
    two = numpy_helper.from_array(np.array(0.5, np.float32), "half")
    return _mlp([helper.make_node("Mul", ["h", "half"], ["s"], name="scale")], ["s"], [two], "benign")


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(1)
    calib, ev = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, x=rng.standard_normal((96, 16)).astype(np.float32))
    np.savez(ev, x=rng.standard_normal((64, 16)).astype(np.float32))
    return calib, ev


def sqnr_db(fp32: str, int8: str, x: np.ndarray) -> float:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a = ort.InferenceSession(fp32, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    b = ort.InferenceSession(int8, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return float(10 * np.log10((a ** 2).sum() / ((a - b) ** 2).sum()))


def test_regions_are_cut_by_weighted_ops_and_keep_their_inputs_quantized():
    m = model_from_proto(layernorm_model())
    quantized = {n.name for n in m.graph.node}
    found = regions(m, quantized)
    assert len(found) == 1
    nodes, tensors = found[0]
    assert set(nodes) == {"bias", "mean", "square", "mean_sq", "mean_2", "var", "var_eps", "sd", "centre", "norm"}
    assert "ln" not in tensors and "m1" not in tensors  # read by / produced by a MatMul: stays quantized
    assert {"h", "m2", "sq"} <= set(tensors)
    assert regions(m, set()) == []  # nothing quantized in it: no region to float


def _run(tmp_path, proto, data, runtime, transforms=None, name="m"):
    calib, ev = data
    model = tmp_path / f"{name}.onnx"
    onnx.save(proto, str(model))
    out = tmp_path / f"{name}.{runtime}.{'all' if transforms is None else len(transforms)}.onnx"
    res = quantize(model, calib, out, eval_data=ev, placement=runtime, auto_transforms=transforms)
    x = np.load(ev)["x"]
    return res, sqnr_db(str(model), str(out), x), onnx.load(str(out))


def test_cancelling_layernorm_is_left_float_for_the_ort_target(tmp_path, data):
    res, with_db, q = _run(tmp_path, layernorm_model(), data, "ort")
    rec = next(t for t in res.transforms if t["name"] == NAME)
    assert rec["kept"] and "var" in rec["nodes"] and rec["held_out_delta"] > 6, rec
    _, without_db, _ = _run(tmp_path, layernorm_model(), data, "ort", transforms=["bias_correction"])
    assert with_db > without_db + 6, (with_db, without_db)  # held out, by ONNX Runtime's outputs
    quantized = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert not {"m2", "sq", "h"} & quantized and "ln" in quantized  # the region float, the MatMul input int8
    assert NAME in res.path


def test_a_benign_elementwise_op_stays_int8(tmp_path, data):
    res, _, q = _run(tmp_path, benign_model(), data, "ort", name="benign")
    rec = next(t for t in res.transforms if t["name"] == NAME)
    assert not rec["kept"], rec
    assert "h" in {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}


def test_the_tensorrt_target_has_no_float_regions(tmp_path, data):
    res, _, _ = _run(tmp_path, layernorm_model(), data, "trt", name="trt")
    assert NAME not in [t["name"] for t in res.transforms]
