"""CLI: calib compare / calib advise, in-process via main(argv) plus one subprocess run; bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from compare_graphs import cnn_data, save_npz, small_cnn

from calib.cli import main

BAD = Path(__file__).parent / "bad_inputs"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    onnx.save(small_cnn(), d / "m.onnx")
    save_npz(d / "eval.npz", cnn_data(40, labels=True), labels=True)
    save_npz(d / "calib.npz", cnn_data(32, seed=7))
    assert main(["-q", "collect", str(d / "m.onnx"), "--data", str(d / "calib.npz"), "-o", str(d / "stats.npz")]) == 0
    assert main(["-q", "export", str(d / "m.onnx"), "--stats", str(d / "stats.npz"), "--method", "minmax",
                 "-o", str(d / "m.int8.onnx")]) == 0
    return d


def test_compare_writes_json_and_html(files, tmp_path, capsys):
    out, html = tmp_path / "c.json", tmp_path / "r.html"
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(str(i % 3) for i in range(40)) + "\n")
    rc = main(["compare", str(files / "m.onnx"), str(files / "m.int8.onnx"), "--data", str(files / "eval.npz"),
               "-o", str(out), "--html", str(html), "--stats", str(files / "stats.npz"), "--sensitivity",
               "--labels", str(labels), "--metric", "test_compare_metrics:batch_agreement"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["n_samples"] == 40 and len(doc["layers"]) == 10
    o = doc["outputs"]["logits"]
    assert doc["outputs"]["_user_metric"]["value"] == pytest.approx(o["top1_agreement"])
    assert o["n_labelled"] == 40 and 0 <= o["accuracy_int8"] <= 1
    assert doc["sensitivity"]["rows"][0]["rank"] == 1
    text = html.read_text()
    assert "Sensitivity ranking" in text and "Histogram:" in text
    printed = capsys.readouterr().out
    assert "layers compared over 40 samples" in printed and str(out) in printed


def test_advise_meets_target_and_writes_sidecar(files, tmp_path, capsys):
    out = tmp_path / "a.int8.onnx"
    rc = main(["advise", str(files / "m.onnx"), "--stats", str(files / "stats.npz"), "--data",
               str(files / "eval.npz"), "--target", "sqnr:40", "-o", str(out), "--method", "percentile:99,minmax"])
    assert rc == 0
    side = json.loads((tmp_path / "a.int8.advice.json").read_text())
    assert side["met"] and side["metric"] >= 40 and side["curve"][0]["step"] == 0
    onnx.checker.check_model(str(out))
    assert "sqnr:" in capsys.readouterr().out


def test_advise_unreachable_target_exits_1_and_keeps_best(files, tmp_path, capsys):
    out = tmp_path / "best.onnx"
    rc = main(["advise", str(files / "m.onnx"), "--stats", str(files / "stats.npz"), "--data",
               str(files / "eval.npz"), "--target", "accuracy:0.99", "-o", str(out), "--method", "minmax"])
    assert rc == 1
    assert out.exists() and (tmp_path / "best.advice.json").exists()
    written = onnx.load(str(out))  # the best model found ships in the default remainder dtype (fp16 for TensorRT)
    assert any(n.op_type == "Cast" for n in written.graph.node)
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in written.graph.initializer)
    err = capsys.readouterr().err
    assert "target accuracy:0.99 not met" in err and "FP32 model itself reaches accuracy" in err


@pytest.mark.parametrize("case", sorted(p.name for p in BAD.glob("compare_*")))
def test_bad_inputs(case, tmp_path, capsys):
    d = BAD / case
    expected = (d / "expected.txt").read_text().strip()
    if (d / "target.txt").exists():
        argv = ["advise", str(d / "fp32.onnx"), "--stats", str(d / "missing_stats.npz"), "--data",
                str(d / "data.npz"), "--target", (d / "target.txt").read_text().strip(), "-o", str(tmp_path / "o.onnx")]
    else:
        argv = ["compare", str(d / "fp32.onnx"), str(d / "int8.onnx"), "--data", str(d / "data.npz"),
                "-o", str(tmp_path / "c.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert not list(tmp_path.iterdir())  # nothing written


def test_bad_labels_file(files, tmp_path, capsys):
    labels = tmp_path / "l.txt"
    labels.write_text("1\n2\ncat\n")
    rc = main(["compare", str(files / "m.onnx"), str(files / "m.int8.onnx"), "--data", str(files / "eval.npz"),
               "-o", str(tmp_path / "c.json"), "--labels", str(labels)])
    assert rc == 2 and "line 3: expected an integer label, got 'cat'" in capsys.readouterr().err


def test_compare_as_a_subprocess(files, tmp_path):
    out = tmp_path / "c.json"
    code = "import sys; from calib.cli import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.run([sys.executable, "-c", code, "-q", "compare", str(files / "m.onnx"),
                        str(files / "m.int8.onnx"), "--data", str(files / "eval.npz"), "-o", str(out), "--limit", "8"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(out.read_text())["n_samples"] == 8
