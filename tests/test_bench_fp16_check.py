"""The peers bench's FP16-model checks (bench/peers/tools/fp16_check.py, issue 17): onnx.checker, ONNX Runtime
CPU, graph I/O kept, FP32 compute nodes outside calib's keep-FP32 list and undocumented reasons, and the top-1
flips between the FP16- and FP32-remainder models, on models calib writes and on hand-broken copies."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from bench_modules import import_bench
from onnx import TensorProto, helper

from calib.calibrate import calibrate, parse_method
from calib.collect import collect
from calib.data import ListSource, Sample
from calib.export import export_qdq
from calib.export.precision import RANGE_OPS, cast_remainder
from calib.graph import QDQ_OPS
from calib.model import model_from_proto
from tests import models

(fp16_check,) = import_bench("fp16_check")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The transformer block (Softmax kept FP32 by the user's list) and the CNN, each FP32, FP32- and
    FP16-remainder, with the scale report's ``high_precision`` entry and evaluation samples."""
    d = tmp_path_factory.mktemp("fp16check")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((10, 6, 8)).astype(np.float32)
    mask = np.ones((10, 6), np.float32)
    src = ListSource([Sample(f"s{i}", {"x": x[i], "mask": mask[i]}) for i in range(10)])
    m = model_from_proto(models.transformer_block())
    stats = collect(m, src)
    q32 = export_qdq(m, calibrate(stats, parse_method("minmax")))
    r = cast_remainder(q32.model, "fp16", stats=stats, keep_fp32=["Softmax"])
    assert r.kept_fp32  # the case has a node kept FP32
    paths = {k: str(d / f"{k}.onnx") for k in ("fp32", "rem", "fp16")}
    for k, p in (("fp32", m.proto), ("rem", q32.model), ("fp16", r.model)):
        onnx.save(p, paths[k])
    hp = {"dtype": "fp16", "nodes": r.kept_fp32, "range_ops": list(RANGE_OPS), "user_list": ["Softmax"]}
    (d / "scales.json").write_text(json.dumps({"high_precision": hp}))
    np.savez(d / "eval.npz", x=x, mask=mask)
    return {**paths, "dir": d, "kept": r.kept_fp32, "report": str(d / "scales.json"), "eval": str(d / "eval.npz"),
            "q32": q32.model}


def test_a_model_calib_writes_passes_every_check(case):
    got = fp16_check.check(case["fp32"], case["fp16"], case["report"], case["rem"], case["eval"], "embed")
    assert got["checker"] == "ok" and got["ort_cpu"] == "ok" and got["io_kept"] and got["io_diff"] == []
    assert got["kept_fp32"] == len(case["kept"]) and got["fp32_compute"] == [] and got["undocumented"] == {}
    assert "flips" not in got  # not a classifier


def test_fp32_compute_outside_the_list_is_found(case, tmp_path):
    (tmp_path / "empty.json").write_text(json.dumps({"high_precision": {"nodes": {}, "range_ops": []}}))
    got = fp16_check.check(case["fp32"], case["fp16"], str(tmp_path / "empty.json"))
    assert sorted(got["fp32_compute"]) == sorted(case["kept"])  # exactly the nodes calib kept FP32
    # the FP32-remainder model computes everything in FP32: every node but Q/DQ (no Cast in it)
    onnx.save(case["q32"], tmp_path / "rem.onnx")
    got = fp16_check.check(case["fp32"], str(tmp_path / "rem.onnx"), str(tmp_path / "empty.json"))
    want = [n.name for n in case["q32"].graph.node if n.op_type not in QDQ_OPS]
    assert sorted(got["fp32_compute"]) == sorted(want) and len(want) >= 8


def test_reasons_must_be_documented_rules():
    ops = ["Softmax"]
    for ok in ("keep_fp32 (user list)", "tensor 'a:0' reaches |x| = 7.1e+04 in the statistics > 3.276e+04",
               "initializer 'w' holds |x| = 1e+05 > 3.276e+04", "MatMul has no fp16 kernel in ONNX opset 19",
               "Softmax can leave the low-precision range and no statistics show it fits"):
        assert fp16_check.documented(ok, ops), ok
    for bad in ("because", "Exp can leave the low-precision range and no statistics show it fits",  # not in range_ops
                "keep_fp32 (user list) and more"):
        assert not fp16_check.documented(bad, ops), bad


def test_renamed_or_retyped_io_is_reported(case, tmp_path):
    p = onnx.load(case["fp16"])
    out = p.graph.output[0].name
    p.graph.node.append(helper.make_node("Identity", [out], ["renamed"], name="rename"))
    p.graph.output[0].CopyFrom(helper.make_tensor_value_info("renamed", TensorProto.FLOAT, None))
    onnx.save(p, tmp_path / "renamed.onnx")
    got = fp16_check.check(case["fp32"], str(tmp_path / "renamed.onnx"), case["report"])
    assert not got["io_kept"] and any(out in d for d in got["io_diff"]) and any("renamed" in d for d in got["io_diff"])
    p.graph.node.append(helper.make_node("Cast", ["renamed"], ["half"], name="half", to=TensorProto.FLOAT16))
    p.graph.output[0].CopyFrom(helper.make_tensor_value_info("half", TensorProto.FLOAT16, None))
    onnx.save(p, tmp_path / "half.onnx")
    got = fp16_check.check(case["fp32"], str(tmp_path / "half.onnx"), case["report"])
    assert any("FLOAT16 not in the FP32 model" in d for d in got["io_diff"])


def test_a_broken_model_fails_checker_and_ort(case, tmp_path):
    p = onnx.load(case["fp16"])
    p.graph.node[0].input[0] = "nowhere"
    onnx.save(p, tmp_path / "broken.onnx")
    got = fp16_check.check(case["fp32"], str(tmp_path / "broken.onnx"), case["report"], eval_npz=case["eval"])
    assert got["checker"] != "ok" and got["ort_cpu"] != "ok"


def _logits_model(path, shift=None) -> str:
    """y = x (+ a constant shift): the 'model' is its input's logits, so the flips are known by construction."""
    nodes = [helper.make_node("Identity", ["x"], ["y"], name="id")] if shift is None else \
        [helper.make_node("Add", ["x", "s"], ["y"], name="add")]
    inits = [] if shift is None else [onnx.numpy_helper.from_array(np.asarray(shift, np.float32), "s")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def test_flips_are_the_near_ties_a_shift_crosses(tmp_path):
    """FP32 model and 'FP16' model: the logits; 'FP32 remainder': class 1 raised by 0.05. Exactly the samples
    whose class 1 trails the top class 0 by less than 0.05 flip, with FP32-remainder margin 0.05 - gap."""
    gaps = np.array([0.01, 0.3, 0.04, 2.0, 0.049, 0.07])
    x = np.zeros((len(gaps), 4), np.float32)
    x[:, 0], x[:, 1], x[:, 2], x[:, 3] = 1.0, 1.0 - gaps, -1.0, -2.0
    fp32, fp16 = _logits_model(tmp_path / "f.onnx"), _logits_model(tmp_path / "h.onnx")
    rem = _logits_model(tmp_path / "r.onnx", [0.0, 0.05, 0.0, 0.0])
    f = fp16_check.flips(fp32, fp16, rem, {"x": x})
    assert f["n"] == 3 and f["of"] == 6 and [s["sample"] for s in f["samples"]] == [0, 2, 4]
    for s in f["samples"]:
        assert (s["fp32_class"], s["fp16_class"], s["fp32_rem_class"]) == (0, 0, 1)
        assert s["fp32_rem_margin"] == pytest.approx(0.05 - gaps[s["sample"]], abs=1e-5)
        assert s["fp16_margin"] == pytest.approx(gaps[s["sample"]], abs=1e-5)
    assert f["fp16_agrees_fp32"] == 6 and f["fp32_rem_agrees_fp32"] == 3
    np.savez(tmp_path / "eval.npz", x=x, labels=np.zeros(6, np.int64))  # labels are not model inputs
    (tmp_path / "r.json").write_text(json.dumps({"high_precision": {"nodes": {}, "range_ops": []}}))
    got = fp16_check.check(fp32, fp16, str(tmp_path / "r.json"), rem, str(tmp_path / "eval.npz"), "classify")
    assert got["flips"]["n"] == 3 and got["ort_cpu"] == "ok"


@pytest.mark.parametrize("dtype,counted", [(TensorProto.FLOAT16, False), (TensorProto.FLOAT, True)])
def test_resize_scales_are_a_float_parameter_not_fp32_compute(dtype, counted):
    """Resize's ``scales`` input is tensor(float) by the ONNX spec whatever X's dtype: an FP16 Resize is FP16."""
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1.0, 1.0, 2.0, 2.0])
    g = helper.make_graph([helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", mode="nearest")], "g",
                          [helper.make_tensor_value_info("x", dtype, [1, 2, 4, 4])],
                          [helper.make_tensor_value_info("y", dtype, [1, 2, 8, 8])], [scales])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert (fp16_check.float32_nodes(m) == ["up"]) is counted
