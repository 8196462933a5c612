"""One test per placement rule; a failure names the node and the input."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from calib.calibrate.base import Ranges, TensorRange
from calib.export import export_qdq
from calib.model import model_from_proto

F = TensorProto.FLOAT
RNG = np.random.default_rng(11)


def make_model(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def vi(name, shape):
    return helper.make_tensor_value_info(name, F, shape)


def w(name, shape):
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def conv(name, x, wname, y, **kw):
    return helper.make_node("Conv", [x, wname], [y], name=name, **kw)


def all_ranges(proto, amax=1.0, special=None):
    names = [i.name for i in proto.graph.input] + [o for n in proto.graph.node for o in n.output]
    t = {n: TensorRange(amax, "minmax") for n in names}
    t.update({k: TensorRange(v, "minmax") for k, v in (special or {}).items()})
    return Ranges("minmax", t)


def export(proto, placement="trt", **kw):
    special = kw.pop("special", None)
    return export_qdq(model_from_proto(proto), all_ranges(proto, special=special), placement=placement, **kw)


def reads_dq(q, node: str, index: int) -> bool:
    g = q.model.graph
    n = next(n for n in g.node if n.name == node)
    src = n.input[index]
    prod = next((p for p in g.node if src in p.output), None)
    return prod is not None and prod.op_type == "DequantizeLinear"


def assert_quantized(q, node, index, rule):
    n = next(n for n in q.model.graph.node if n.name == node)
    assert reads_dq(q, node, index), f"{rule}: node '{node}' input {index} ('{n.input[index]}') should read a DQ"


def assert_float(q, node, index, rule):
    n = next(n for n in q.model.graph.node if n.name == node)
    assert not reads_dq(q, node, index), f"{rule}: node '{node}' input {index} ('{n.input[index]}') should stay float"


def runs(q, shape):
    ort.InferenceSession(q.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {q.model.graph.input[0].name: RNG.standard_normal(shape).astype(np.float32)})


# ---------------------------------------------------------------- TensorRT rules


def test_quantize_weighted_op_inputs():
    rule = "quantize_weighted_op_inputs"
    nodes = [conv("conv", "x", "W", "c"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "r"], ["qk"], name="attn_mm"),
             helper.make_node("Relu", ["qk"], ["y"], name="out")]
    proto = make_model(nodes, [vi("x", [1, 2, 4, 4])], [vi("y", [1, 4, 4, 4])], [w("W", [4, 2, 1, 1])])
    q = export(proto)
    assert_quantized(q, "conv", 0, rule)
    assert_quantized(q, "conv", 1, rule)
    assert_quantized(q, "attn_mm", 0, rule)
    assert_quantized(q, "attn_mm", 1, rule)
    assert_float(q, "relu", 0, rule + " (Conv output must not be quantized)")
    assert q.rules["x"] == [rule]
    runs(q, [1, 2, 4, 4])


def _residual():
    # x -> conv_a -> a (shortcut source); a -> conv_b -> bn -> b (backbone); add(b, a)
    nodes = [conv("conv_a", "x", "Wa", "a"),
             conv("conv_b", "a", "Wb", "cb"),
             helper.make_node("BatchNormalization", ["cb", "g", "be", "m", "v"], ["b"], name="bn"),
             helper.make_node("Add", ["b", "a"], ["s"], name="res_add"),
             helper.make_node("Relu", ["s"], ["y"], name="out")]
    inits = [w("Wa", [4, 2, 1, 1]), w("Wb", [4, 4, 1, 1])] + [
        numpy_helper.from_array(np.abs(RNG.standard_normal(4)).astype(np.float32) + 0.5, n)
        for n in ("g", "be", "m", "v")]
    return make_model(nodes, [vi("x", [1, 2, 4, 4])], [vi("y", [1, 4, 4, 4])], inits)


def test_quantize_residual_add_shortcut():
    rule = "quantize_residual_add_shortcut"
    q = export(_residual())
    assert_quantized(q, "res_add", 1, rule + " (shortcut 'a')")
    assert_float(q, "res_add", 0, rule + " (backbone 'b' from conv_b -> bn)")
    assert rule in q.rules["a"]
    runs(q, [1, 2, 4, 4])


def test_residual_rule_ignores_add_of_constant():
    nodes = [conv("conv", "x", "W", "c"), helper.make_node("Add", ["c", "bias"], ["s"], name="bias_add"),
             helper.make_node("Relu", ["s"], ["y"], name="out")]
    proto = make_model(nodes, [vi("x", [1, 2, 4, 4])], [vi("y", [1, 4, 4, 4])],
                       [w("W", [4, 2, 1, 1]), w("bias", [1, 4, 1, 1])])
    q = export(proto)
    assert_float(q, "bias_add", 0, "quantize_residual_add_shortcut")
    assert_float(q, "bias_add", 1, "quantize_residual_add_shortcut")


def test_quantize_pooling_next_to_quantized():
    rule = "quantize_pooling_next_to_quantized"
    nodes = [conv("conv1", "x", "W1", "c1"),
             helper.make_node("MaxPool", ["c1"], ["p1"], name="pool_between_convs", kernel_shape=[2, 2]),
             conv("conv2", "p1", "W2", "c2"),
             helper.make_node("Sigmoid", ["c2"], ["s"], name="sig"),
             helper.make_node("Sigmoid", ["s"], ["s2"], name="sig2"),
             helper.make_node("AveragePool", ["s2"], ["p2"], name="pool_between_floats", kernel_shape=[1, 1]),
             helper.make_node("Sigmoid", ["p2"], ["y"], name="out")]
    proto = make_model(nodes, [vi("x", [1, 2, 4, 4])], [vi("y", [1, 2, 3, 3])],
                       [w("W1", [2, 2, 1, 1]), w("W2", [2, 2, 1, 1])])
    q = export(proto)
    assert_quantized(q, "pool_between_convs", 0, rule)
    assert_float(q, "pool_between_floats", 0, rule + " (no quantized neighbour)")
    runs(q, [1, 2, 4, 4])


def test_share_concat_scale_uses_max_amax():
    rule = "share_concat_scale"
    nodes = [conv("conv1", "x", "W1", "a"), conv("conv2", "x", "W2", "b"),
             conv("conv_a", "a", "W3", "ya"),
             helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
             conv("conv3", "cat", "W4", "y")]
    proto = make_model(nodes, [vi("x", [1, 2, 4, 4])], [vi("y", [1, 2, 4, 4]), vi("ya", [1, 2, 4, 4])],
                       [w("W1", [2, 2, 1, 1]), w("W2", [2, 2, 1, 1]), w("W3", [2, 2, 1, 1]), w("W4", [2, 4, 1, 1])])
    q = export(proto, special={"a": 2.0, "b": 5.0, "cat": 3.0})
    assert ["a", "cat"] in q.shared or ["cat", "a"] in q.shared, f"{rule}: group {q.shared}"
    assert q.amax["a"] == q.amax["cat"] == 3.0, f"{rule}: node 'cat' input 0 ('a') and output scale differ"
    inits = {t.name: numpy_helper.to_array(t) for t in q.model.graph.initializer}
    assert inits["a_scale"] == inits["cat_scale"] == np.float32(3.0 / 127)
    runs(q, [1, 2, 4, 4])


def test_skip_huge_tensors():
    rule = "skip_huge_tensors"
    nodes = [helper.make_node("MatMul", ["x", "x"], ["s"], name="scores"),
             helper.make_node("Add", ["s", "mask"], ["sm"], name="add_mask"),
             helper.make_node("MatMul", ["sm", "mask"], ["y0"], name="mm_mask"),
             helper.make_node("Relu", ["y0"], ["y"], name="out")]
    proto = make_model(nodes, [vi("x", [4, 4]), vi("mask", [4, 4])], [vi("y", [4, 4])])
    q = export(proto, special={"mask": 3.4e38})
    assert_float(q, "mm_mask", 1, rule)
    assert_quantized(q, "mm_mask", 0, rule + " (the other input)")
    assert "mask" in q.skipped and "mask-like" in q.skipped["mask"]
    q2 = export(proto, flagged={"sm": "12 of 16 values were NaN/inf"})
    assert_float(q2, "mm_mask", 0, rule + " (flagged)")
    assert q2.skipped["sm"].startswith("flagged")


def test_keep_graph_output_producers_float():
    rule = "keep_graph_output_producers_float"
    nodes = [conv("conv", "x", "W", "c"),
             helper.make_node("MaxPool", ["c"], ["p"], name="pool_out", kernel_shape=[1, 1]),
             helper.make_node("Flatten", ["c"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "Wg"], ["logits"], name="gemm_out", transB=1)]
    proto = make_model(nodes, [vi("x", [1, 2, 2, 2])], [vi("p", [1, 2, 2, 2]), vi("logits", [1, 3])],
                       [w("W", [2, 2, 1, 1]), w("Wg", [3, 8])])
    q = export(proto)
    assert_float(q, "pool_out", 0, rule + " (pooling producing a graph output)")
    assert_quantized(q, "gemm_out", 0, rule + " (weighted op producing a graph output)")
    assert_quantized(q, "gemm_out", 1, rule)


def test_drop_excluded():
    q = export(_residual(), exclude=["conv_b"])
    assert_float(q, "conv_b", 0, "drop_excluded")
    assert_float(q, "conv_b", 1, "drop_excluded")
    assert_quantized(q, "conv_a", 0, "drop_excluded (not excluded)")


# ---------------------------------------------------------------- ONNX Runtime rule


def test_quantize_ort_node_io():
    rule = "quantize_ort_node_io"
    q = export(_residual(), placement="ort")
    # BN folded into conv_b; conv outputs quantized so QLinearConv can form; Add gets both inputs
    assert q.folded == ["cb"]
    assert_quantized(q, "res_add", 0, rule)
    assert_quantized(q, "res_add", 1, rule)
    assert_quantized(q, "conv_b", 0, rule)
    assert "s" in q.activation_tensors, f"{rule}: Add output 's' (input 0 of 'out') should be quantized"
    assert "y" not in q.activation_tensors, f"{rule}: graph output 'y' must never be quantized"
    so = ort.SessionOptions()
    sess = ort.InferenceSession(q.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = RNG.standard_normal((1, 2, 4, 4)).astype(np.float32)
    sess.run(None, {"x": x})


def test_trt_placement_keeps_batchnorm_and_all_names():
    q = export(_residual())
    assert q.folded == []
    assert any(n.op_type == "BatchNormalization" for n in q.model.graph.node)


@pytest.mark.parametrize("placement", ["trt", "ort"])
def test_exported_models_pass_checker(placement):
    onnx.checker.check_model(export(_residual(), placement=placement).model, full_check=True)


def test_ort_placement_quantizes_only_collected_tensors():
    """Regression (magika, --target-runtime ort): LayerNorm output -> Unsqueeze -> strided Slice -> Conv -> Slice
    -> Squeeze. The ort placement quantizes the inputs and outputs of Unsqueeze/Slice/Squeeze; collection must
    collect them (it did not: 'no range for 2 tensor(s) the ort placement quantizes')."""
    from calib.calibrate import calibrate
    from calib.collect import collect
    from calib.data import ListSource, Sample
    from calib.export.placement import ORT_INT8_OPS
    from calib.model import QUANTIZABLE_OPS

    assert ORT_INT8_OPS <= QUANTIZABLE_OPS  # every tensor the ort placement can quantize is collected
    ints = lambda name, v: numpy_helper.from_array(np.array(v, dtype=np.int64), name)  # noqa: E731
    nodes = [helper.make_node("Add", ["x", "b"], ["ln"], name="ln"),
             helper.make_node("Unsqueeze", ["ln", "ax2"], ["u"], name="unsq"),
             helper.make_node("Slice", ["u", "st", "en", "ax3", "step2"], ["s"], name="slice"),
             conv("conv", "s", "W", "c"),
             helper.make_node("Slice", ["c", "st", "en4", "ax3"], ["s2"], name="slice2"),
             helper.make_node("Squeeze", ["s2", "ax2"], ["y"], name="sq")]
    inits = [w("b", [16]), w("W", [4, 8, 1, 1]), ints("ax2", [2]), ints("ax3", [3]), ints("st", [0]),
             ints("en", [16]), ints("en4", [4]), ints("step2", [2])]
    proto = make_model(nodes, [vi("x", [1, 8, 16])], [vi("y", [1, 4, 4])], inits)
    model = model_from_proto(proto)
    feeds = [{"x": RNG.standard_normal((1, 8, 16)).astype(np.float32)} for _ in range(8)]  # batch of 1
    stats = collect(model, ListSource([Sample(f"s{i}", f) for i, f in enumerate(feeds)], layout="feed"))
    assert {"u", "s", "s2", "y"} <= set(stats.tensors)
    q = export_qdq(model, calibrate(stats, "minmax"), placement="ort")
    for node, index in (("slice", 0), ("conv", 0), ("slice2", 0), ("sq", 0)):
        assert_quantized(q, node, index, "ort placement")
    # The Q/DQ semantics are checked unfused (ORT_DISABLE_ALL): on x86 without VNNI ORT's fused u8s8 Conv adds
    # int8 pairs into int16 with saturation (calib.cpu), which is the CPU's error, not the placement's.
    spec = ort.SessionOptions()
    spec.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(q.model.SerializeToString(), spec, providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got, want = sess.run(None, feeds[0])[0], ref.run(None, feeds[0])[0]
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
