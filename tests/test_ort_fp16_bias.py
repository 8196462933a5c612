"""ONNX Runtime's WeightBiasQuantization rewrite overflows FP16 Conv biases of a TensorRT-target model
(calib.export.ort_bias): the nodes are named, recorded in the scale report and printed.

References are independent of calib's detection: ONNX Runtime itself (default optimisation vs ORT_DISABLE_ALL
vs disabled_optimizers=["WeightBiasQuantization"]) and the bias tensors of the graph ONNX Runtime optimised
(saved with optimized_model_filepath, then evaluated unoptimised). The tests fail if ONNX Runtime ever fixes
the rewrite (no damage any more) or if the detection names the wrong nodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from calib.cli import main
from calib.export.ort_bias import ORT_TRANSFORMER, ort_bias_overflow, ort_bias_report

FP16_MAX = float(np.finfo(np.float16).max)


def _conv_chain(big_bias: float, branch: bool = False) -> onnx.ModelProto:
    """x -> conv_a -> Relu -> conv_b (small weights, channel 0's bias ``big_bias``) -> Relu -> conv_c -> y.
    conv_b's input is quantized per tensor, its weight per channel, its output reaches conv_c's
    QuantizeLinear through a Relu: the pattern ONNX Runtime rewrites. ``branch``: conv_b's output also
    feeds a second Relu (graph output z), which the rewrite does not match."""
    rng = np.random.default_rng(7)
    b_b = np.full(4, 0.01, np.float32)
    b_b[0] = big_bias
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w_a", rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32)),
        ("b_a", rng.normal(0, 0.05, 8).astype(np.float32)),
        ("w_b", rng.normal(0, 0.01, (4, 8, 1, 1)).astype(np.float32)),
        ("b_b", b_b),
        ("w_c", rng.normal(0, 1.0, (2, 4, 1, 1)).astype(np.float32)),
        ("b_c", np.zeros(2, np.float32))]]
    nodes = [helper.make_node("Conv", ["x", "w_a", "b_a"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
             helper.make_node("Conv", ["ra", "w_b", "b_b"], ["b"], name="conv_b"),
             helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
             helper.make_node("Conv", ["rb", "w_c", "b_c"], ["y"], name="conv_c")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 8, 8])]
    if branch:
        nodes.append(helper.make_node("Relu", ["b"], ["z"], name="relu_z"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4, 8, 8]))
    g = helper.make_graph(nodes, "conv_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m


def _export(tmp: Path, big_bias: float, capsys, branch: bool = False) -> tuple[onnx.ModelProto, dict, str, np.ndarray]:
    """calib's default export (TensorRT placement, fp16 remainder): model, scale report, printed text, data."""
    x = np.random.default_rng(1).standard_normal((32, 3, 8, 8)).astype(np.float32)
    onnx.save(_conv_chain(big_bias, branch), tmp / "m.onnx")
    np.savez(tmp / "calib.npz", x=x[:16])
    assert main(["-q", "collect", str(tmp / "m.onnx"), "--data", str(tmp / "calib.npz"), "-o", str(tmp / "s.npz")]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp / "m.onnx"), "--stats", str(tmp / "s.npz"), "-m", "minmax",
                 "-o", str(tmp / "q.onnx"), "--report", str(tmp / "scales.json")]) == 0
    out = capsys.readouterr().out
    return onnx.load(tmp / "q.onnx"), json.loads((tmp / "scales.json").read_text()), out, x[16:]


def _run(path: Path, x: np.ndarray, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, disabled=()) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))
    return s.run(None, {"x": x})[0].astype(np.float64)


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def _biases_ort_feeds(path: Path, tmp: Path) -> dict[str, np.ndarray]:
    """The bias each rewritten Conv gets in the graph ONNX Runtime optimised (its DQ output, evaluated)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp / "ort_opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    o = onnx.load(tmp / "ort_opt.onnx")
    producer = {t: n for n in o.graph.node for t in n.output}
    fed = {n.name: n.input[2] for n in o.graph.node if n.op_type == "Conv" and len(n.input) > 2
           and producer.get(n.input[2]) is not None and producer[n.input[2]].op_type == "DequantizeLinear"}
    o.graph.output.extend([helper.make_empty_tensor_value_info(t) for t in fed.values()])
    off = ort.SessionOptions()
    off.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(o.SerializeToString(), off, providers=["CPUExecutionProvider"])
    outs = s.run(list(fed.values()), {"x": np.zeros((1, 3, 8, 8), np.float32)})
    return {name: v.astype(np.float64) for name, v in zip(fed, outs)}


def test_overflowing_bias_is_named_recorded_and_printed(tmp_path, capsys):
    q, doc, out, _ = _export(tmp_path, 2.0, capsys)
    biases = {t.name: t for t in q.graph.initializer}
    conv_b = next(n for n in q.graph.node if n.name == "conv_b")
    assert biases[conv_b.input[2]].data_type == TensorProto.FLOAT16  # the fp16 remainder TensorRT gets
    found = ort_bias_overflow(q)
    assert [f["node"] for f in found] == ["conv_b"]
    assert found[0]["channels"] == 1 and found[0]["of"] == 4 and found[0]["max_ratio"] > FP16_MAX
    entry = doc["onnxruntime_fp16_bias"]
    assert [n["node"] for n in entry["nodes"]] == ["conv_b"]
    assert ORT_TRANSFORMER in entry["workaround"] and "--target-runtime ort" in entry["workaround"]
    line = [s for s in out.splitlines() if s.startswith("ONNX Runtime:")]
    assert len(line) == 1 and "conv_b" in line[0] and ORT_TRANSFORMER in line[0]


def test_onnxruntime_itself_breaks_the_flagged_node_and_the_workaround_restores_it(tmp_path, capsys):
    q, _, _, x = _export(tmp_path, 2.0, capsys)
    path = tmp_path / "q.onnx"
    spec = _run(path, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    default = _run(path, x)
    assert not np.isfinite(default).all() or _rel(default, spec) > 0.5  # ONNX Runtime's default: garbage
    assert _rel(_run(path, x, disabled=[ORT_TRANSFORMER]), spec) < 0.02  # the workaround: the spec outputs
    # the biases ONNX Runtime feeds its rewritten Convs: wrong exactly at the flagged node
    original = {n.name: numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == n.input[2]))
                for n in q.graph.node if n.op_type == "Conv"}
    fed = _biases_ort_feeds(path, tmp_path)
    assert "conv_b" in fed
    wrong = sorted(k for k, v in fed.items()
                   if not np.allclose(v, original[k].astype(np.float64), rtol=1e-2, atol=1e-3))
    assert wrong == [f["node"] for f in ort_bias_overflow(q)] == ["conv_b"]


def test_bias_under_the_limit_is_not_flagged_and_onnxruntime_agrees(tmp_path, capsys):
    q, doc, out, x = _export(tmp_path, 0.02, capsys)
    assert ort_bias_overflow(q) == [] and ort_bias_report(q) is None
    assert "onnxruntime_fp16_bias" not in doc and "ONNX Runtime:" not in out
    path = tmp_path / "q.onnx"
    spec = _run(path, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert _rel(_run(path, x), spec) < 0.02
    fed = _biases_ort_feeds(path, tmp_path)
    assert "conv_b" in fed  # ONNX Runtime did rewrite it, correctly


def test_calib_quantize_records_and_prints_it(tmp_path, capsys):
    """The default `calib quantize` (TensorRT target, fp16 remainder): the same node in scales.json and one line."""
    x = np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32)
    onnx.save(_conv_chain(2.0), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=x)
    assert main(["quantize", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "calib.npz"), "-m", "minmax",
                 "-o", str(tmp_path / "q.onnx"), "--report", str(tmp_path / "scales.json")]) == 0
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / "scales.json").read_text())
    assert [n["node"] for n in doc["onnxruntime_fp16_bias"]["nodes"]] == ["conv_b"]
    assert [f["node"] for f in ort_bias_overflow(onnx.load(tmp_path / "q.onnx"))] == ["conv_b"]
    assert sum(s.startswith("ONNX Runtime:") and "conv_b" in s for s in out.splitlines()) == 1


def test_branching_output_is_not_rewritten_and_not_flagged(tmp_path, capsys):
    """The rewrite's conditions, not only the ratio: conv_b's output feeding two nodes is left alone."""
    q, doc, _, x = _export(tmp_path, 2.0, capsys, branch=True)
    assert ort_bias_overflow(q) == [] and "onnxruntime_fp16_bias" not in doc
    path = tmp_path / "q.onnx"
    assert _rel(_run(path, x), _run(path, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)) < 0.02
    assert "conv_b" not in _biases_ort_feeds(path, tmp_path)


def test_calib_advise_prints_it_for_the_model_it_writes(tmp_path, capsys):
    """`calib advise` writes its model with the fp16 remainder too: the same one line names the node."""
    x = np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32)
    onnx.save(_conv_chain(2.0), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=x)
    assert main(["-q", "collect", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "calib.npz"),
                 "-o", str(tmp_path / "s.npz")]) == 0
    capsys.readouterr()
    rc = main(["advise", str(tmp_path / "m.onnx"), "--stats", str(tmp_path / "s.npz"), "--data",
               str(tmp_path / "calib.npz"), "--method", "minmax", "--target", "cosine:0.5", "-o", str(tmp_path / "a.onnx")])
    assert rc == 0
    out = capsys.readouterr().out
    assert [f["node"] for f in ort_bias_overflow(onnx.load(tmp_path / "a.onnx"))] == ["conv_b"]
    assert sum(s.startswith("ONNX Runtime:") and "conv_b" in s for s in out.splitlines()) == 1


def test_calib_import_cache_prints_and_reports_it(tmp_path, capsys):
    """A TensorRT cache imported into an fp16-remainder Q/DQ model: the same node named, line and report."""
    x = np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32)
    onnx.save(_conv_chain(2.0), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=x)
    assert main(["-q", "quantize", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "calib.npz"), "-m", "minmax",
                 "-o", str(tmp_path / "q.onnx"), "--cache", str(tmp_path / "m.cache")]) == 0
    capsys.readouterr()
    assert main(["import-cache", str(tmp_path / "m.onnx"), str(tmp_path / "m.cache"), "-o", str(tmp_path / "i.onnx"),
                 "--report", str(tmp_path / "import.json")]) == 0
    out = capsys.readouterr().out
    assert [f["node"] for f in ort_bias_overflow(onnx.load(tmp_path / "i.onnx"))] == ["conv_b"]
    assert sum(s.startswith("ONNX Runtime:") and "conv_b" in s for s in out.splitlines()) == 1
    doc = json.loads((tmp_path / "import.json").read_text())
    assert [n["node"] for n in doc["onnxruntime_fp16_bias"]["nodes"]] == ["conv_b"]
