"""FP32 <-> Q/DQ tensor mapping by graph structure (never by name)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from compare_graphs import calib_qdq, cnn_data, ort_qdq, small_cnn
from onnx import TensorProto, helper, numpy_helper
from reference import metrics as ref

from calib.compare import map_models
from calib.errors import ModelError
from calib.model import load_model, model_from_proto


def _run(proto: onnx.ModelProto, tensors: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    del m.graph.output[:]
    m.graph.output.extend([helper.make_empty_tensor_value_info(t) for t in tensors])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip(tensors, s.run(tensors, {"x": x})))


@pytest.fixture(scope="module")
def ort_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("ortq")
    fp = d / "fp32.onnx"
    onnx.save(small_cnn(), fp)
    q = ort_qdq(fp, d / "int8.onnx", cnn_data(16))
    return load_model(fp), load_model(q)


def test_ort_quantize_static_renamed_tensors_map_by_structure(ort_pair):
    fm, qm = ort_pair
    tm = map_models(fm, qm)
    conv1_q = next(n for n in qm.graph.node if n.op_type == "Conv" and
                   qm.producers[n.input[0]].op_type == "DequantizeLinear" and
                   qm.producers[qm.producers[n.input[0]].input[0]].input[0] == "x")
    assert tm.tensor_map["c1"] == conv1_q.output[0]
    # ORT removed relu1 and gave its name to conv1's output: same name, different value
    assert conv1_q.output[0] == "r1"
    assert tm.tensor_map["r1"] != "r1"
    assert qm.producers[tm.tensor_map["r1"]].op_type == "DequantizeLinear"
    assert "relu1" not in tm.nodes and "conv1" in tm.nodes
    # the graph output's producer is renamed when ORT quantizes the output
    gemm = next(n for n in qm.graph.node if n.op_type == "Gemm")
    assert tm.tensor_map["logits"] == gemm.output[0]
    assert set(tm.quantized) >= {"conv1", "conv2", "conv3", "fc"}


def test_mapped_tensors_carry_the_same_values(ort_pair):
    """Every mapped pair is close (INT8 noise only); the name-based pair r1<->r1 is not."""
    fm, qm = ort_pair
    tm = map_models(fm, qm)
    x = cnn_data(8).samples
    xb = np.stack([s.feeds["x"] for s in x])
    fo = _run(fm.proto, [p.fp32 for p in tm.pairs], xb)
    qo = _run(qm.proto, [p.qdq for p in tm.pairs] + ["r1"], xb)
    for p in tm.pairs:
        assert ref.cosine(fo[p.fp32], qo[p.qdq]) > 0.98, p
    assert ref.cosine(fo["r1"], qo["r1"]) < 0.9  # relu output vs raw conv output


def test_export_trt_mapping_agrees_with_export_tensor_map():
    m = model_from_proto(small_cnn())
    _, _, q = calib_qdq(m, cnn_data(16))
    tm = map_models(m, model_from_proto(q.model))
    assert not tm.unmatched
    for p in tm.pairs:
        assert q.tensor_map[p.fp32] == p.qdq
    assert set(tm.quantized) == set(q.quantized_nodes)


def _conv_bn_model() -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32) * 0.3, n) for n, s in
             [("W", (4, 3, 3, 3)), ("W2", (2, 4, 1, 1))]]
    inits += [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
              [("g", rng.uniform(0.5, 1.5, 4)), ("b", rng.normal(size=4)), ("mu", rng.normal(size=4) * 0.1),
               ("var", rng.uniform(0.5, 2, 4))]]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "mu", "var"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "W2"], ["y"], name="conv2")]
    g = helper.make_graph(nodes, "convbn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 12, 12])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    return m


def test_folded_batchnorm_pairs_with_the_folded_conv():
    m = model_from_proto(_conv_bn_model())
    _, _, q = calib_qdq(m, cnn_data(16), placement="ort")
    assert q.folded, "the ort placement folds BatchNormalization"
    tm = map_models(m, model_from_proto(q.model))
    assert tm.folded == {"bn": "conv"}
    assert tm.tensor_map["bn"] == "bn"
    assert "c" not in tm.tensor_map and "folded" in tm.skipped["c"]
    # the float weight of the folded conv is recovered (BN applied), so "conv in float" equals FP32 conv+BN
    from calib.compare.mapping import float_constant

    w_in = next(qi for qi in tm.quantized["conv"] if qi.index == 1)
    w = float_constant(tm, "conv", w_in)
    xb = np.stack([s.feeds["x"] for s in cnn_data(4).samples])
    fo = _run(m.proto, ["bn"], xb)["bn"]
    b_in = next((qi for qi in tm.quantized["conv"] if qi.index == 2), None)
    qconv = next(n for n in q.model.graph.node if n.name == "conv")
    bias = float_constant(tm, "conv", b_in) if b_in else numpy_helper.to_array(
        next(t for t in q.model.graph.initializer if t.name == qconv.input[2]))
    conv = helper.make_graph([helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])], "c",
                             [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                             [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")])
    cm = helper.make_model(conv, opset_imports=[helper.make_opsetid("", 17)])
    cm.ir_version = 10
    y = ort.InferenceSession(cm.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": xb})[0]
    np.testing.assert_allclose(y, fo, rtol=1e-4, atol=1e-4)


def test_branches_reading_one_tensor_pair_by_weights():
    """Two Convs read x (different kernels): pairs follow the weights, not the order."""
    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "Wa"),
             numpy_helper.from_array(rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "Wb")]
    nodes = [helper.make_node("Conv", ["x", "Wa"], ["a"], name="ca", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "Wb"], ["b"], name="cb"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    g = helper.make_graph(nodes, "br", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 12, 12])], inits)
    fp = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    fp.ir_version = 10
    # the Q/DQ model lists the branches in the other order and renames everything
    q = onnx.ModelProto()
    q.CopyFrom(fp)
    qn = [helper.make_node("Conv", ["x", "Wb"], ["t1"], name="n1"),
          helper.make_node("Conv", ["x", "Wa"], ["t2"], name="n2", pads=[1, 1, 1, 1]),
          helper.make_node("Add", ["t2", "t1"], ["y"], name="n3")]
    del q.graph.node[:]
    q.graph.node.extend(qn)
    tm = map_models(model_from_proto(fp), model_from_proto(q))
    assert tm.nodes == {"ca": "n2", "cb": "n1", "add": "n3"}
    assert tm.tensor_map["a"] == "t2" and tm.tensor_map["b"] == "t1"


def test_unrelated_model_is_refused(tmp_path):
    fm = model_from_proto(small_cnn(seed=0))
    other = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["g"], name="gap"),
         helper.make_node("Flatten", ["g"], ["f"], name="fl"),
         helper.make_node("Gemm", ["f", "W"], ["logits"], name="fc", transB=1)],
        "other", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 6])],
        [numpy_helper.from_array(np.ones((6, 3), np.float32), "W")])
    om = helper.make_model(other, opset_imports=[helper.make_opsetid("", 17)])
    om.ir_version = 10
    with pytest.raises(ModelError, match="does not derive from the FP32 model.*first without one: 'conv1' \\(Conv\\)"):
        map_models(fm, model_from_proto(om))


def test_inputs_or_outputs_that_differ_are_refused():
    fm = model_from_proto(small_cnn())
    renamed = small_cnn()
    renamed.graph.input[0].name = "image"
    renamed.graph.node[0].input[0] = "image"
    with pytest.raises(ModelError, match="inputs differ: FP32 has \\['x'\\], Q/DQ has \\['image'\\]"):
        map_models(fm, model_from_proto(renamed))
    out = small_cnn()
    out.graph.output[0].name = "scores"
    out.graph.node[-1].output[0] = "scores"
    with pytest.raises(ModelError, match="outputs differ"):
        map_models(fm, model_from_proto(out))
    shape = small_cnn()
    shape.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 16
    with pytest.raises(ModelError, match="input 'x' differs"):
        map_models(fm, model_from_proto(shape))
