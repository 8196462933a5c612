"""Issue 7: one-shot quantize end to end, recorded runs, the store under kill, runs/show/diff, --help."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from calib.cli import app, main
from calib.runs import COMPLETE, RunStore
from tests.dashboard_run import copy_store, demo_model, hash_tree, shared_store


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return shared_store(tmp_path_factory)


def _sha(p: Path) -> str:
    import hashlib

    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_quantize_one_shot_end_to_end(demo, tmp_path, capsys):
    _, pages = demo
    model = demo_model()
    before = _sha(model)
    out = tmp_path / "m.int8.onnx"
    rc = main(["quantize", str(model), "--data", str(pages / "calib"), "-o", str(out), "--cache",
               str(tmp_path / "m.cache"), "--report", str(tmp_path / "scales.json"), "-b", "8"])
    assert rc == 0, capsys.readouterr().err
    assert _sha(model) == before  # the input model is never written
    q = onnx.load(str(out))
    onnx.checker.check_model(q)
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    y = sess.run(None, {"x": x})[0]
    assert y.shape == (2, 4) and np.isfinite(y).all()
    cache = (tmp_path / "m.cache").read_text().splitlines()
    assert cache[0] == "TRT-100300-EntropyCalibration2" and all(": " in line for line in cache[1:])
    rep = json.loads((tmp_path / "scales.json").read_text())
    assert rep["chosen_method"] == "auto" and rep["activations"] and rep["weights"]  # the default: per tensor
    assert {"entropy", "minmax", "percentile", "mse"} <= set(rep["methods"])


def test_quantize_best_with_target_picks_a_method_and_meets_it(demo, tmp_path, capsys):
    _, pages = demo
    out = tmp_path / "best.onnx"
    rc = main(["quantize", str(demo_model()), "--data", str(pages / "calib"), "--eval-data", str(pages / "eval"),
               "--method", "best", "--target", "top1:0.9", "-o", str(out), "-b", "8"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "best method on the evaluation data:" in text and "met: True" in text
    advice = json.loads(out.with_name("best.advice.json").read_text())
    assert out.exists() and advice["met"] is True and advice["curve"][0]["step"] == 0


def test_best_scores_every_method_in_one_pass_as_compare_does(demo, tmp_path):
    """quantize --method best scores the methods in one pass (FP32 once, outputs only); its numbers must
    equal a separate full ``compare`` of each method's exported model."""
    from calib.compare import compare
    from calib.data import open_source
    from calib.export import export_qdq
    from calib.model import load_model
    from calib.data.split import split_source
    from calib.pipeline import quantize, task_metrics

    _, pages = demo
    res = quantize(demo_model(), pages / "calib", tmp_path / "b.onnx", method="best", eval_data=pages / "eval",
                   batch_size=8, limit=32)
    assert set(res.metrics) == set(res.ranges) and res.best in res.metrics
    # without a target, best = highest output SQNR (top-1 agreement ties are noise at this size)
    assert res.metrics[res.best]["sqnr_db"] == max(m["sqnr_db"] for m in res.metrics.values())
    model = load_model(demo_model())
    # best chooses on the selection part of the calibration data (never on the data it reports on)
    ev = split_source(open_source(pages / "calib", model), 0.25).select
    for label, r in res.ranges.items():
        rep = compare(model, export_qdq(model, r).model, ev, batch_size=8, layers=False)
        ref = task_metrics(rep)
        for k in ("cosine", "sqnr_db", "top1_agreement"):
            assert res.metrics[label][k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12), (label, k)


def test_best_with_bias_correction_scores_both_versions_and_writes_the_winner(demo, tmp_path):
    """Each method is scored with and without bias correction in one pass; the model written is the winner,
    and a separate full ``compare`` of it reproduces the winner's numbers."""
    from calib.compare import compare
    from calib.data import open_source
    from calib.model import load_model
    from calib.data.split import split_source
    from calib.pipeline import BC_SUFFIX, quantize, task_metrics

    _, pages = demo
    out = tmp_path / "bc.onnx"
    # best scores FP32-remainder models: write one (the default fp16 remainder is checked below)
    res = quantize(demo_model(), pages / "calib", out, method="best", eval_data=pages / "eval", batch_size=8,
                   limit=32, bias_correction=True, bias_samples=16, high_precision="fp32")
    assert set(res.metrics) == set(res.ranges) | {m + BC_SUFFIX for m in res.ranges}
    assert res.metrics[res.best]["sqnr_db"] == max(m["sqnr_db"] for m in res.metrics.values())
    assert res.bias["kept"] == res.best.endswith(BC_SUFFIX) and res.bias["n_samples"] == 16
    written = onnx.load(str(out))
    corrected = any(t.name.endswith("_bias_corrected") for t in written.graph.initializer)
    assert corrected == res.bias["kept"]
    model = load_model(demo_model())
    sel = split_source(open_source(pages / "calib", model), 0.25).select  # what best chose on
    ref = task_metrics(compare(model, written, sel, batch_size=8, layers=False))
    for k in ("cosine", "sqnr_db"):
        assert res.metrics[res.best][k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12), k


def test_default_quantize_writes_fp16_and_reports_both_remainders(demo, tmp_path):
    """The TensorRT default writes an FP16 remainder; ``shipped`` is what a full compare of the written model gives
    on the evaluation data, ``remainder`` what the same run with ``high_precision='fp32'`` writes."""
    from calib.compare import compare
    from calib.data import open_source
    from calib.model import load_model
    from calib.pipeline import quantize, task_metrics

    _, pages = demo
    a, b = tmp_path / "fp16.onnx", tmp_path / "fp32.onnx"
    kw = dict(method="minmax", eval_data=pages / "eval", batch_size=8, limit=32)
    res = quantize(demo_model(), pages / "calib", a, **kw)
    res32 = quantize(demo_model(), pages / "calib", b, high_precision="fp32", **kw)
    w16, w32 = onnx.load(str(a)), onnx.load(str(b))
    assert onnx.TensorProto.FLOAT16 in {t.data_type for t in w16.graph.initializer}
    assert onnx.TensorProto.FLOAT16 not in {t.data_type for t in w32.graph.initializer} and not res32.remainder
    model = load_model(demo_model())
    ev = open_source(pages / "eval", model)
    for written, numbers in ((w16, res.shipped), (w32, res.remainder), (w32, res32.shipped)):
        ref = task_metrics(compare(model, written, ev, batch_size=8, layers=False))
        for k in ("cosine", "sqnr_db", "top1_agreement"):
            assert numbers[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12), k


def test_bias_correction_without_eval_data_is_applied_and_export_takes_it_too(demo, tmp_path, capsys):
    _, pages = demo
    a, b, c = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "c.onnx"
    stats = tmp_path / "s.npz"
    assert main(["quantize", str(demo_model()), "--data", str(pages / "calib"), "-o", str(a), "-m", "mse",
                 "--bias-correction", "--bias-samples", "8", "--limit", "16", "-b", "8"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("bias correction:"))
    assert "on the selection samples" in line  # verified on held-out samples, even without evaluation data
    kept = "not kept" not in line
    assert main(["collect", str(demo_model()), "--data", str(pages / "calib"), "-o", str(stats), "--limit", "16",
                 "-b", "8"]) == 0
    assert main(["export", str(demo_model()), "--stats", str(stats), "-m", "mse", "-o", str(b),
                 "--bias-data", str(pages / "calib"), "--bias-samples", "8"]) == 0
    assert "bias correction:" in capsys.readouterr().out
    assert main(["export", str(demo_model()), "--stats", str(stats), "-m", "mse", "-o", str(c)]) == 0

    def biases(p):
        m = onnx.load(str(p))
        return {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer if "bias_corrected" in t.name}

    got_a, got_b = biases(a), biases(b)
    assert got_b and not biases(c) and bool(got_a) == kept
    assert not got_a or set(got_a) == set(got_b)
    for k in got_a:  # the same statistics and samples give the same correction either way
        np.testing.assert_allclose(got_a[k], got_b[k], rtol=1e-5, atol=1e-7)


def test_bias_correction_after_advise_is_verified_and_recorded(demo, tmp_path):
    from calib.pipeline import quantize

    _, pages = demo
    out = tmp_path / "adv.onnx"
    res = quantize(demo_model(), pages / "calib", out, method="percentile", eval_data=pages / "eval",
                   target="cosine:0.9", batch_size=8, limit=32, bias_correction=True, bias_samples=16)
    side = json.loads(out.with_name("adv.advice.json").read_text())
    assert side["bias_correction"]["kept"] == res.bias["kept"]
    with_, without = (res.bias["scores"][k]["cosine"] for k in ("with", "without"))
    assert res.bias["kept"] == (with_ >= without)
    written = onnx.load(str(out))
    assert any(t.name.endswith("_bias_corrected") for t in written.graph.initializer) == res.bias["kept"]
    if res.bias["kept"]:  # the advice describes the model written
        assert side["curve"][-1]["action"] == "bias correction"
        assert side["metric"] == pytest.approx(with_, rel=1e-9)


def test_best_prefers_the_target_metric_then_sqnr():
    from calib.pipeline import _score

    a = {"top1_agreement": 0.98, "sqnr_db": 26.0, "cosine": 0.998}
    b = {"top1_agreement": 0.96, "sqnr_db": 30.0, "cosine": 0.999}
    assert max([a, b], key=lambda m: _score(m, "")) is b
    assert max([a, b], key=lambda m: _score(m, "top1:0.99")) is a
    assert max([a, dict(b, top1_agreement=0.98)], key=lambda m: _score(m, "top1:0.99"))["sqnr_db"] == 30.0
    assert _score({"sqnr_db": float("nan")}, "") < _score({"sqnr_db": 1.0}, "")


def test_quantize_bad_target_is_exit_2(demo, tmp_path, capsys):
    _, pages = demo
    rc = main(["quantize", str(demo_model()), "--data", str(pages / "calib"), "--eval-data", str(pages / "eval"),
               "--target", "top1=0.9", "-o", str(tmp_path / "x.onnx")])
    assert rc == 2
    assert "expected METRIC:VALUE" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def _config(tmp: Path, pages: Path, store: Path, primary: str | None = None, **extra) -> Path:
    lines = ["[run]", 'name = "t"', f'store = "{store}"', "[model]", f'path = "{demo_model()}"', "[data]",
             f'calib = "{pages / "calib"}"', f'eval = "{pages / "eval"}"', "batch_size = 8",
             "[calibrate]", 'methods = ["entropy", "minmax"]', *([f'primary = "{primary}"'] if primary else []),
             "[compare]", "html = false"]
    for sec, body in extra.items():
        lines.append(f"[{sec}]")
        lines.extend(body)
    p = tmp / "c.toml"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_run_records_everything_and_reuses_statistics(demo, tmp_path, capsys):
    src_store, pages = demo
    store = copy_store(src_store, tmp_path / "store")
    cfg = _config(tmp_path, pages, store, primary="entropy")  # a named method: auto's choice has its own tests
    assert main(["run", str(cfg)]) == 0
    assert main(["run", str(cfg)]) == 0
    runs = RunStore(store).runs()
    new = [r for r in runs if r.manifest["name"] == "t"]
    assert len(new) == 2 and all(r.is_complete for r in new)
    latest, first = new
    m = latest.manifest
    assert m["versions"]["onnx"] and m["versions"]["polygraphy"] and m["model"]["sha256"]
    assert m["data"]["fingerprint"] and "collect" in m["timings_s"]
    assert m.get("stats_reused_from") == first.id  # same model + data: statistics reused
    for key in ("config", "stats", "ranges", "qdq:entropy", "qdq:minmax", "compare:entropy", "model", "cache",
                "scales"):
        assert latest.artifact(key).exists(), key
    assert json.loads((latest.dir / "config.json").read_text())["batch_size"] == 8
    capsys.readouterr()
    assert main(["runs", "--store", str(store)]) == 0
    listing = capsys.readouterr().out
    assert latest.id in listing and "complete" in listing
    assert main(["show", latest.id, "--store", str(store)]) == 0
    shown = capsys.readouterr().out
    assert "stats.npz" in shown and "timings" in shown
    assert main(["diff", first.id, latest.id, "--store", str(store)]) == 0
    assert "0 of" in capsys.readouterr().out  # identical statistics: no range changed


def test_run_with_bias_correction_records_it_and_writes_the_kept_model(demo, tmp_path):
    src_store, pages = demo
    store = copy_store(src_store, tmp_path / "store")
    cfg = _config(tmp_path, pages, store, export=["bias_correction = true", "bias_samples = 8",
                                                  "all_methods = false"], target=['metric = "cosine:0.5"'])
    assert main(["run", str(cfg)]) == 0
    run = [r for r in RunStore(store).runs() if r.manifest["name"] == "t"][0]
    info = json.loads(run.artifact("bias").read_text())
    assert info["n_samples"] == 8 and info["nodes"] > 0 and "with" in info["scores"]
    assert run.manifest["metrics"]["bias_correction"] == ("kept" if info["kept"] else "not kept")
    model = onnx.load(str(run.artifact("model")))
    assert any(t.name.endswith("_bias_corrected") for t in model.graph.initializer) == info["kept"]
    adv = json.loads(run.artifact("advise").read_text())
    assert adv["bias_correction"]["kept"] == info["kept"]
    if info["kept"]:
        assert adv["metric"] == pytest.approx(info["scores"]["with"]["cosine"], rel=1e-9)


def test_show_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "store" / "x").mkdir(parents=True)
    assert main(["show", str(tmp_path / "store" / "x"), "--store", str(tmp_path / "store")]) == 2
    assert "not a calib run" in capsys.readouterr().err


def test_killed_run_is_incomplete_and_others_are_intact(demo, tmp_path):
    src_store, pages = demo
    store = copy_store(src_store, tmp_path / "store")
    before = hash_tree(store)
    cfg = _config(tmp_path, pages, store)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-c", "from calib.cli import entry; entry()", "-q", "run", str(cfg)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        victim = None
        while time.time() < deadline and victim is None:
            for d in store.iterdir():
                mf = d / "run.json"
                if d.name not in {p.split("/")[0] for p in before} and mf.exists():
                    try:
                        m = json.loads(mf.read_text())
                    except ValueError:
                        continue
                    if "collect" in m.get("timings_s", {}):  # past collection, inside export/compare
                        victim = d
            time.sleep(0.05)
        assert victim is not None, "the run did not reach its compare stage"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    after = hash_tree(store)
    assert {k: v for k, v in after.items() if k in before} == before  # earlier runs untouched
    st = RunStore(store)
    killed = st.get(victim.name)
    assert killed.status == "incomplete" and not (victim / COMPLETE).exists()
    assert [i.status for i in st.list() if i.id == victim.name] == ["incomplete"]
    for f in victim.iterdir():  # whatever was written is whole; temp files are hidden
        if f.name.startswith("."):
            continue
        if f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".onnx":
            onnx.load(str(f))
        elif f.suffix == ".npz":
            from calib.stats import ActivationStats

            ActivationStats.load(f)


def test_every_command_has_help_with_examples():
    import typer.main

    cmd = typer.main.get_command(app)
    for name, sub in cmd.commands.items():
        if name in {"dashboard"}:
            continue
        assert sub.epilog and "calib " in sub.epilog, f"'calib {name} --help' has no example"


def test_console_script_exit_code_and_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-c", "from calib.cli import entry; entry()", "run",
                        str(tmp_path / "nope.toml")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("calib: error: ") and "Traceback" not in r.stderr
