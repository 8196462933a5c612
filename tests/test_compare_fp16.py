"""compare / sensitivity / local error on an FP16-remainder Q/DQ model (issue 17): the boundary Casts are seen through.

The FP16 model must pair the same FP32 tensors and nodes as the FP32-remainder model of the same ranges, and
every reported number is checked against ONNX Runtime's outputs of the two models with the slow reference metrics.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from reference import metrics as ref

from calib.calibrate import calibrate, parse_method
from calib.compare import compare, map_models
from calib.compare.sensitivity import node_variants
from calib.data import ListSource, Sample
from calib.export import export_qdq
from calib.export.precision import cast_remainder
from calib.graph import is_precision_cast
from calib.model import model_from_proto
from calib.collect import collect
from tests import models


def _data(name: str, n: int = 12):
    rng = np.random.default_rng(3)
    if name == "cnn":
        x = rng.standard_normal((n, 3, 16, 16)).astype(np.float32)
        return ListSource([Sample(f"s{i}", {"x": x[i]}) for i in range(n)])
    x = rng.standard_normal((n, 6, 8)).astype(np.float32)
    mask = np.ones((n, 6), np.float32)
    mask[:, -2:] = 0
    return ListSource([Sample(f"s{i}", {"x": x[i], "mask": mask[i]}) for i in range(n)])


def _pair(name: str, keep_fp32=()):
    m = model_from_proto(models.cnn_residual() if name == "cnn" else models.transformer_block())
    src = _data(name)
    stats = collect(m, src)
    q32 = export_qdq(m, calibrate(stats, parse_method("minmax")))
    q16 = cast_remainder(q32.model, "fp16", stats=stats, keep_fp32=keep_fp32)
    return m, src, q32, q16


def _run(proto, outputs, src):
    p = onnx.ModelProto()
    p.CopyFrom(proto)
    del p.graph.output[:]
    p.graph.output.extend([helper.make_empty_tensor_value_info(t) for t in outputs])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(p.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {k: np.stack([x.feeds[k] for x in src]) for k in src.samples[0].feeds}
    return dict(zip(outputs, s.run(outputs, feeds)))


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_fp16_model_pairs_the_same_layers_as_fp32(name):
    m, _, q32, q16 = _pair(name)
    assert any(is_precision_cast(n) for n in q16.model.graph.node)  # the case has boundary Casts
    t32, t16 = map_models(m, model_from_proto(q32.model)), map_models(m, model_from_proto(q16.model))
    assert not t16.unmatched and t16.nodes.keys() == t32.nodes.keys()
    assert t16.tensor_map.keys() == t32.tensor_map.keys() and len(t16.pairs) >= 8
    assert t16.quantized.keys() == t32.quantized.keys()
    for node, ins in t32.quantized.items():
        assert [(q.index, q.is_weight) for q in ins] == [(q.index, q.is_weight) for q in t16.quantized[node]]
    # the graph input x reaches the FP16 model through a Cast: its quantized input names x as its value
    first = t16.quantized["conv1" if name == "cnn" else "q_proj"][0]
    assert first.value == "x" and first.source != "x" and len(first.chain) == 3


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_fp16_compare_numbers_match_onnx_runtime(name):
    m, src, q32, q16 = _pair(name)
    r16 = compare(m, q16, src, batch_size=4)
    r32 = compare(m, q32, src, batch_size=4)
    rows16 = {r["fp32_tensor"]: r for r in r16.layers}
    rows32 = {r["fp32_tensor"]: r for r in r32.layers}
    assert rows16.keys() == rows32.keys()
    fo = _run(m.proto, list(rows16), src)
    qo = _run(q16.model, [r["qdq_tensor"] for r in rows16.values()], src)
    for t, r in rows16.items():
        want = ref.layer_metrics([fo[t]], [qo[r["qdq_tensor"]]])
        assert r["cosine"] == pytest.approx(want["cosine"], abs=1e-5), t
        if np.isfinite(want["sqnr_db"]):
            assert r["sqnr_db"] == pytest.approx(want["sqnr_db"], abs=1e-3), t
            # an FP16 remainder adds FP16 rounding only: within 1.5 dB of the FP32-remainder model
            assert abs(r["sqnr_db"] - rows32[t]["sqnr_db"]) < 1.5, (t, r["sqnr_db"], rows32[t]["sqnr_db"])
        # the local error (node in INT8 on FP32 inputs) is measured for the same nodes
        assert (r["local_sqnr_db"] is None) == (rows32[t]["local_sqnr_db"] is None), t
        if r["local_sqnr_db"] is not None and np.isfinite(rows32[t]["local_sqnr_db"]):
            assert abs(r["local_sqnr_db"] - rows32[t]["local_sqnr_db"]) < 1.5, t


def test_float_variants_of_an_fp16_model_run_and_keep_dtypes():
    """Sensitivity's all-float base of an FP16 model: every quantized node reads float in the dtype it read
    before (a Cast is added where needed), so it runs on ORT and matches the FP32 model to FP16 rounding. Keeping
    residual1 FP32 puts a Cast *after* a shared DequantizeLinear: that input still counts as quantized."""
    m, src, _, q16 = _pair("transformer", keep_fp32=["residual1"])
    tm = map_models(m, model_from_proto(q16.model))
    assert 1 in [q.index for q in tm.quantized["residual1"]]  # x_dq -> Cast(fp32) -> residual1
    float_base, quant_base, _, floats, _ = node_variants(tm)
    assert len(floats) == len(tm.quantized)
    onnx.checker.check_model(float_base, full_check=True)
    out = m.output_names[0]
    ref_y, got = _run(m.proto, [out], src)[out], _run(float_base, [out], src)[out]
    assert got.dtype == np.float32 and ref.cosine(ref_y, got) > 0.9999
    q_y = _run(quant_base, [out], src)[out]
    assert np.abs(got - ref_y).max() < np.abs(q_y - ref_y).max()  # float is closer than INT8
    r = compare(m, q16, src, batch_size=4, sensitivity=True, sensitivity_samples=12)
    assert {row["node"] for row in r.sensitivity["rows"]} == set(tm.quantized)


def test_a_float_to_float_cast_in_the_fp32_model_is_seen_through():
    """A Cast float->float in the FP32 model itself (no counterpart once the Q/DQ model is FP16) is a no-op."""
    proto = models.gemm_mlp()
    g = proto.graph
    first = g.node[0]
    orig_in = first.input[0]
    g.node.insert(0, helper.make_node("Cast", [orig_in], ["x_same"], name="noop_cast", to=TensorProto.FLOAT))
    first.input[0] = "x_same"
    m = model_from_proto(proto)
    src = ListSource([Sample(f"s{i}", {orig_in: v}) for i, v in
                      enumerate(np.random.default_rng(0).standard_normal((8, 10)).astype(np.float32))])
    stats = collect(m, src)
    q16 = cast_remainder(export_qdq(m, calibrate(stats, parse_method("minmax"))).model, "fp16", stats=stats)
    tm = map_models(m, model_from_proto(q16.model))
    assert not tm.unmatched and "x_same" in tm.skipped and len(tm.nodes) == len(m.graph.node) - 1


def test_compare_of_an_opset_raised_fp16_model_with_reduce_axes_attribute(tmp_path):
    """An FP32 model at opset 17 whose ReduceMean carries ``axes`` as an attribute; the default export's FP16
    remainder raises the Q/DQ model to opset 19 (``axes`` became an input at 18). ``calib compare`` builds its
    local-error model from the FP32 graph at the Q/DQ opset: it must convert the FP32 nodes, not relabel them
    (ONNX Runtime refused the relabelled graph: "Unrecognized attribute: axes"). Local errors come out."""
    from calib.cli import main

    rng = np.random.default_rng(0)
    w = helper.make_tensor("W", TensorProto.FLOAT, (16, 8), rng.standard_normal(128).astype(np.float32))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("ReduceMean", ["h"], ["m"], name="mean", axes=[-1], keepdims=1),
             helper.make_node("Sub", ["h", "m"], ["y"], name="centre")]
    g = helper.make_graph(nodes, "reduce17", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((16, 16)).astype(np.float32))
    assert main(["-q", "quantize", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "-m", "minmax",
                 "-o", str(tmp_path / "q.onnx")]) == 0
    q = onnx.load(tmp_path / "q.onnx")
    assert next(o.version for o in q.opset_import if o.domain in ("", "ai.onnx")) >= 19
    assert main(["-q", "compare", str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), "--data",
                 str(tmp_path / "d.npz"), "-o", str(tmp_path / "c.json")]) == 0
    import json
    rows = {r["node"]: r for r in json.loads((tmp_path / "c.json").read_text())["layers"]}
    assert rows["mm"]["local_sqnr_db"] is not None and rows["mm"]["local_sqnr_db"] > 20
