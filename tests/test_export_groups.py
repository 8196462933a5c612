"""TensorRT fusion groups (issue 17): expected groups written by hand from each test graph."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calib.calibrate.base import Ranges, TensorRange
from calib.errors import ConfigError
from calib.export import export_qdq
from calib.export.groups import expand_to_groups, fusion_groups, group_index, modelopt_exclude
from calib.export.precision import cast_remainder
from calib.model import model_from_proto
from tests import models

CNN = [("conv", ("conv1", "relu1")), ("conv", ("conv2", "residual_add", "relu2")), ("single", ("gap",)),
       ("single", ("flatten",)), ("gemm", ("fc",))]


def _pairs(groups):
    return [(g.kind, g.nodes) for g in groups]


def test_cnn_residual_groups():
    assert _pairs(fusion_groups(models.cnn_residual())) == CNN


def test_qdq_and_fp16_models_give_the_same_groups():
    m = model_from_proto(models.cnn_residual())
    names = [i.name for i in m.graph.input] + [o for n in m.graph.node for o in n.output]
    q = export_qdq(m, Ranges("minmax", {t: TensorRange(2.0, "minmax") for t in names}))
    assert any(n.op_type == "QuantizeLinear" for n in q.model.graph.node)
    assert _pairs(fusion_groups(q.model)) == CNN
    assert _pairs(fusion_groups(cast_remainder(q.model, "fp16").model)) == CNN


def test_attention_block_is_one_group():
    groups = fusion_groups(models.transformer_block())
    idx = group_index(groups)
    att = idx["softmax"]
    assert att.kind == "attention"
    assert set(att.nodes) == {"scores", "scale", "mask_scores", "softmax", "context"}
    assert idx["q_proj"].kind == "gemm" and idx["q_proj"] is not att
    assert idx["o_proj"].nodes == ("o_proj", "residual1")


def _bn_concat_model():
    """x -> convA -> BN -> Relu -+
       x -> convB -------------+-> Concat -> convC -> y"""
    rng = np.random.default_rng(0)
    w = lambda n, s: numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)  # noqa: E731
    inits = [w("wa", (4, 3, 1, 1)), w("wb", (4, 3, 1, 1)), w("wc", (2, 8, 1, 1)),
             numpy_helper.from_array(np.ones(4, np.float32), "g"), numpy_helper.from_array(np.zeros(4, np.float32), "b"),
             numpy_helper.from_array(np.zeros(4, np.float32), "mu"), numpy_helper.from_array(np.ones(4, np.float32), "var")]
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="convA"),
             helper.make_node("BatchNormalization", ["a", "g", "b", "mu", "var"], ["abn"], name="bn"),
             helper.make_node("Relu", ["abn"], ["ar"], name="reluA"),
             helper.make_node("Conv", ["x", "wb"], ["bb"], name="convB"),
             helper.make_node("Concat", ["ar", "bb"], ["cat"], name="cat", axis=1),
             helper.make_node("Conv", ["cat", "wc"], ["y"], name="convC")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m


def test_concat_joins_its_input_groups_and_bn_fuses():
    groups = fusion_groups(_bn_concat_model())
    assert _pairs(groups) == [("concat", ("convA", "bn", "reluA", "convB", "cat")), ("conv", ("convC",))]


def test_modelopt_exclude_widens_to_groups():
    groups = fusion_groups(models.cnn_residual())
    doc = modelopt_exclude(["residual_add"], groups)
    assert doc["nodes_to_exclude"] == ["conv2", "residual_add", "relu2"]
    for pat, name in zip(doc["nodes_to_exclude_regex"], doc["nodes_to_exclude"]):
        assert re.match(pat, name) and not re.match(pat, name + "x")
    assert doc["groups"] == [{"kind": "conv", "anchor": "conv2", "nodes": ["conv2", "residual_add", "relu2"]}]
    assert [g.anchor for g in expand_to_groups(["relu1", "fc"], groups)] == ["conv1", "fc"]
    with pytest.raises(ConfigError, match="nope"):
        modelopt_exclude(["nope"], groups)


def test_fp16_transformer_groups_match_fp32():
    """In an FP16 model the graph inputs pass through Casts: they are still activations, not weights."""
    m = model_from_proto(models.transformer_block())
    names = [i.name for i in m.graph.input] + [o for n in m.graph.node for o in n.output]
    q = export_qdq(m, Ranges("minmax", {t: TensorRange(2.0, "minmax") for t in names}))
    fp16 = cast_remainder(q.model, "fp16", range_ops=(), keep_fp32=["mask_fmin", "mask_scores", "mask_unsqueeze"])
    assert _pairs(fusion_groups(fp16.model)) == _pairs(fusion_groups(models.transformer_block()))
