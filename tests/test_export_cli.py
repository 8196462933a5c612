"""``calib export`` and ``calib build-engine`` end to end, in-process and once as a subprocess."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from calib.cli import main
from calib.export import read_cache

BAD = Path(__file__).parent / "bad_inputs"
F = TensorProto.FLOAT


def _model(tmp_path: Path, name="model.onnx", seed=0) -> Path:
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "W2"], ["c2"], name="conv2"),
             helper.make_node("Add", ["c2", "p1"], ["s"], name="res_add"),
             helper.make_node("GlobalAveragePool", ["s"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "Wg"], ["logits"], name="fc", transB=1)]
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.3, n)
             for n, s in (("W1", (8, 3, 3, 3)), ("W2", (8, 8, 1, 1)), ("Wg", (4, 8)))]
    g = helper.make_graph(nodes, "small_cnn", [helper.make_tensor_value_info("x", F, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", F, ["N", 4])], inits)
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    proto.metadata_props.add(key="labels", value="a,b,c,d")
    p = tmp_path / name
    p.write_bytes(proto.SerializeToString())
    return p


def _collected(tmp_path: Path, n: int) -> tuple[Path, Path, Path]:
    """The small CNN, ``n`` calibration samples and their statistics (``calib collect``)."""
    model = _model(tmp_path)
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((n, 3, 8, 8)).astype(np.float32))
    stats = tmp_path / "stats.npz"
    assert main(["-q", "collect", str(model), "--data", str(data), "-o", str(stats)]) == 0
    return model, data, stats


@pytest.fixture
def setup(tmp_path):
    model, _, stats = _collected(tmp_path, 6)
    return model, stats, tmp_path


def test_export_writes_model_cache_report_and_keeps_input(setup):
    model, stats, tmp = setup
    before = hashlib.sha256(model.read_bytes()).hexdigest()
    out, cache, report = tmp / "m.int8.onnx", tmp / "m.cache", tmp / "scales.json"
    rc = main(["-q", "export", str(model), "--stats", str(stats), "--method", "entropy", "-o", str(out),
               "--cache", str(cache), "--report", str(report)])
    assert rc == 0
    assert hashlib.sha256(model.read_bytes()).hexdigest() == before, "the input model file changed"
    q = onnx.load(str(out))
    onnx.checker.check_model(q)
    assert {p.key: p.value for p in q.metadata_props} == {"labels": "a,b,c,d"}
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert y.shape == (2, 4)
    ranges = read_cache(cache)
    assert "x" in ranges and "c1" in ranges  # network input and an intermediate, FP32 names
    doc = json.loads(report.read_text())
    assert doc["chosen_method"] == "entropy" and set(doc["methods"]) >= {"entropy", "minmax", "mse"}
    by_t = {a["tensor"]: a for a in doc["activations"]}
    assert by_t["x"]["n"] == 6 * 3 * 8 * 8 and by_t["x"]["n_nonfinite"] == 0
    assert np.float32(ranges["x"].amax / 127) == np.float32(by_t["x"]["scale"])


def test_export_from_ranges_json_and_ort_placement(setup):
    model, stats, tmp = setup
    rjson = tmp / "ranges.json"
    assert main(["-q", "calibrate", str(stats), "--method", "minmax,entropy", "-o", str(rjson)]) == 0
    out = tmp / "m.ort.onnx"
    assert main(["-q", "export", str(model), "--ranges", str(rjson), "--method", "minmax", "--placement", "ort",
                 "-o", str(out)]) == 0
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "QuantizeLinear" in ops


def test_ranges_json_needs_a_method_when_it_has_several(setup, capsys):
    model, stats, tmp = setup
    rjson = tmp / "ranges.json"
    assert main(["-q", "calibrate", str(stats), "--method", "minmax,entropy", "-o", str(rjson)]) == 0
    assert main(["export", str(model), "--ranges", str(rjson), "-o", str(tmp / "o.onnx")]) == 2
    assert "pick one with --method" in capsys.readouterr().err


def test_foreign_ranges_file(setup, capsys):
    model, _, tmp = setup
    case = BAD / "export_ranges_foreign"
    rc = main(["export", str(model), "--ranges", str(case / "ranges.json"), "-o", str(tmp / "o.onnx")])
    assert rc == 2
    assert (case / "expected.txt").read_text().strip() in capsys.readouterr().err
    assert not (tmp / "o.onnx").exists()


def test_stats_of_another_model(setup, capsys):
    _, stats, tmp = setup
    other = _model(tmp, "other.onnx", seed=5)
    assert main(["export", str(other), "--stats", str(stats), "-o", str(tmp / "o.onnx")]) == 2
    assert "another model" in capsys.readouterr().err


def test_unknown_exclude_lists_close_matches(setup, capsys):
    model, stats, tmp = setup
    assert main(["export", str(model), "--stats", str(stats), "-o", str(tmp / "o.onnx"), "--exclude", "conv3"]) == 2
    err = capsys.readouterr().err
    assert "exclude 'conv3'" in err and "'conv1'" in err


def test_exclude_keeps_node_float(setup):
    model, stats, tmp = setup
    out = tmp / "o.onnx"
    assert main(["-q", "export", str(model), "--stats", str(stats), "-o", str(out), "-x", "fc", "-x", "conv1"]) == 0
    written = onnx.load(str(out)).graph
    nodes = {n.name: list(n.input) for n in written.node}
    made_by = {o: n for n in written.node for o in n.output}
    # no Q/DQ on either; the default fp16 remainder casts the graph input x once (and W1 keeps its name in fp16)
    assert nodes["fc"] == ["f", "Wg"] and nodes["conv1"][1:] == ["W1"]
    cast = made_by[nodes["conv1"][0]]
    assert cast.op_type == "Cast" and list(cast.input) == ["x"]


def test_unwritable_output_path(setup, capsys):
    model, stats, tmp = setup
    blocker = tmp / "not_a_folder"
    blocker.write_text("a file")
    assert main(["export", str(model), "--stats", str(stats), "-o", str(blocker / "m.int8.onnx")]) == 2
    assert "cannot create the output folder" in capsys.readouterr().err


def test_failed_write_leaves_previous_output_intact(setup, monkeypatch, capsys):
    model, stats, tmp = setup
    out = tmp / "m.int8.onnx"
    out.write_bytes(b"previous export")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("calib.io.os.fsync", broken_fsync)
    assert main(["-q", "export", str(model), "--stats", str(stats), "-o", str(out)]) == 2  # one line, no traceback
    assert "No space left" in capsys.readouterr().err
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith(".")) == [], "a temp file was left behind"


def test_needs_exactly_one_of_stats_and_ranges(setup, capsys):
    model, stats, tmp = setup
    assert main(["export", str(model), "-o", str(tmp / "o.onnx")]) == 2
    assert "exactly one of --stats and --ranges" in capsys.readouterr().err


def test_build_engine_print_trtexec(capsys):
    assert main(["build-engine", "model.int8.onnx", "-o", "model.engine", "--print-trtexec"]) == 0
    out = capsys.readouterr().out
    assert "trtexec --onnx=model.int8.onnx --saveEngine=model.engine --stronglyTyped" in out
    assert main(["build-engine", "fp32.onnx", "--cache", "m.cache", "-o", "e", "--print-trtexec"]) == 0
    assert "--int8 --calib=m.cache" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_build_engine_without_tensorrt_is_a_clear_error(setup, capsys):
    model, stats, tmp = setup
    out = tmp / "m.int8.onnx"
    assert main(["-q", "export", str(model), "--stats", str(stats), "-o", str(out)]) == 0
    assert main(["build-engine", str(out), "-o", str(tmp / "m.engine")]) == 2
    err = capsys.readouterr().err
    assert "tensorrt does not import here" in err and "--print-trtexec" in err


def test_export_help_has_examples():
    r = subprocess.run([sys.executable, "-c", "import sys; from calib.cli import entry; sys.argv[0]='calib'; entry()",
                        "export", "--help"], capture_output=True, text=True, cwd=Path(__file__).parents[1],
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert "--placement" in r.stdout and "calib export model.onnx --stats stats.npz" in r.stdout


# ---- --method auto: the default with --data --------------------------------------------------------------


@pytest.fixture
def auto_setup(tmp_path):
    return (*_collected(tmp_path, 24), tmp_path)


def test_export_with_data_is_auto_and_equals_quantize(auto_setup):
    """`export --stats S --data D` (no --method) is auto: the same model, byte for byte, as `quantize --data D`
    (which collects S itself), with the per-tensor choice in the scale report."""
    model, data, stats, tmp = auto_setup
    out, report, q = tmp / "auto.onnx", tmp / "scales.json", tmp / "q.onnx"
    assert main(["-q", "export", str(model), "--stats", str(stats), "--data", str(data), "-o", str(out),
                 "--report", str(report)]) == 0
    assert main(["-q", "quantize", str(model), "--data", str(data), "-o", str(q)]) == 0
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(q.read_bytes()).hexdigest()
    doc = json.loads(report.read_text())
    assert doc["chosen_method"] == "auto"


def test_export_without_data_keeps_entropy(auto_setup):
    model, _, stats, tmp = auto_setup
    report = tmp / "scales.json"
    assert main(["-q", "export", str(model), "--stats", str(stats), "-o", str(tmp / "e.onnx"),
                 "--report", str(report)]) == 0
    assert json.loads(report.read_text())["chosen_method"] == "entropy"


@pytest.mark.parametrize("extra, says", [
    (["--method", "auto"], "--method auto needs --data"),
    (["--method", "auto", "--data", "{data}", "--weights", "per_tensor"], "--weights per_tensor with --method auto"),
    (["--data", "{data}", "--bias-data", "{data}"], "--bias-data with --method auto"),
])
def test_export_auto_refuses_what_it_cannot_take(auto_setup, capsys, extra, says):
    model, data, stats, tmp = auto_setup
    out = tmp / "never.onnx"
    argv = ["export", str(model), "--stats", str(stats), "-o", str(out)] + [a.format(data=data) for a in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) <= 2, err
    assert not out.exists()


def test_export_auto_with_ranges_is_refused(auto_setup, capsys):
    model, data, stats, tmp = auto_setup
    ranges = tmp / "ranges.json"
    assert main(["-q", "calibrate", str(stats), "-o", str(ranges)]) == 0
    assert main(["export", str(model), "--ranges", str(ranges), "--method", "auto", "--data", str(data),
                 "-o", str(tmp / "never.onnx")]) == 2
    assert "give --stats" in capsys.readouterr().err


def test_export_auto_never_writes_over_its_data(auto_setup, capsys):
    model, data, stats, _ = auto_setup
    before = data.read_bytes()
    assert main(["export", str(model), "--stats", str(stats), "--data", str(data), "-o", str(data)]) == 2
    assert "refusing to write over an input" in capsys.readouterr().err and data.read_bytes() == before
