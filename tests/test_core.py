"""Issue 14 (one orchestration core), 19 (run outcome, shipped-model reports), 18 item 4 ([sampling]).

``calib quantize``, ``calib run`` and the dashboard's "new run" execute one plan: the same inputs give
byte-identical model, cache and scale-report files and the same metrics whichever entry point ran it. The
metrics are checked against an independent full ``compare`` of the written model file.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from calib.cli import main
from calib.compare import compare
from calib.config import RunConfig
from calib.data import open_source
from calib.errors import TargetNotMet
from calib.model import load_model
from calib.pipeline import DEFAULT_METHODS, execute, quantize, task_metrics
from calib.runs import RunStore
from tests import models

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Path]:
    """A small residual CNN, 48 calibration and 40 labelled evaluation samples."""
    d = tmp_path_factory.mktemp("core")
    model = d / "cnn.onnx"
    onnx.save(models.cnn_residual(seed=3), str(model))
    rng = np.random.default_rng(0)
    np.savez(d / "calib.npz", x=rng.normal(0, 1, (48, 3, 16, 16)).astype(np.float32))
    x = rng.normal(0, 1, (40, 3, 16, 16)).astype(np.float32)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    np.savez(d / "eval.npz", x=x, labels=sess.run(None, {"x": x})[0].argmax(1))
    return {"dir": d, "model": model, "calib": d / "calib.npz", "eval": d / "eval.npz"}


def _sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def _cfg(case, store: Path, primary: str, **kw) -> RunConfig:
    base = dict(name="core", store=store, model=case["model"], calib_data=case["calib"], eval_data=case["eval"],
                batch_size=8, methods=list(DEFAULT_METHODS), primary=primary, all_methods=False, html=False)
    return RunConfig(**{**base, **kw})


def _dashboard_run(cfg: RunConfig, store: Path, monkeypatch) -> str:
    """What the dashboard's "New run" button does: ``apps/actions.start_run`` in a background job."""
    pytest.importorskip("streamlit", reason="the dashboard needs streamlit")
    monkeypatch.setenv("CALIB_STORE", str(store))
    monkeypatch.syspath_prepend(str(REPO / "apps"))
    sys.modules.pop("state", None)
    sys.modules.pop("actions", None)
    import actions  # apps/actions.py

    job = actions.start_run("core-test", "core test", cfg)
    job.thread.join(300)
    assert job.error is None, (job.error, job.hint)
    return job.result


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@pytest.mark.parametrize("method", ["percentile", "best"])
def test_quantize_run_and_dashboard_give_the_same_files_and_metrics(case, tmp_path, method, monkeypatch):
    out = tmp_path / "q" / "m.int8.onnx"
    res = quantize(case["model"], case["calib"], out, method=method, eval_data=case["eval"],
                   cache=tmp_path / "q" / "m.cache", report=tmp_path / "q" / "scales.json", batch_size=8)
    store = tmp_path / "store"
    run = execute(_cfg(case, store, method), store=RunStore(store))
    dash = RunStore(store).get(_dashboard_run(_cfg(case, store, method), store, monkeypatch))
    for r in (run, dash):
        assert r.status == "complete"
        assert _sha(r.artifact("model")) == _sha(out)
        assert _sha(r.artifact("cache")) == _sha(tmp_path / "q" / "m.cache")
        assert _sha(r.artifact("scales")) == _sha(tmp_path / "q" / "scales.json")
        shipped = _numbers(r.manifest["metrics"])
        remainder = {k[len("fp32_remainder_"):]: shipped.pop(k) for k in list(shipped) if k.startswith("fp32_remainder_")}
        assert shipped == _numbers(res.shipped) and shipped["sqnr_db"] > 0
        assert remainder == _numbers(res.remainder) and remainder  # the default fp16 remainder's FP32 twin
        assert r.manifest["metrics_by_method"] == res.metrics
    # the recorded numbers are the written model's, as a separate full comparison measures them
    fm = load_model(case["model"])
    ref = task_metrics(compare(fm, onnx.load(str(out)), open_source(case["eval"], fm), batch_size=8, layers=False))
    for k in ("cosine", "sqnr_db", "top1_agreement", "accuracy_int8"):
        assert res.shipped[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12), k
    if method == "best":  # best = the highest output SQNR among the methods
        assert res.best == max(res.metrics, key=lambda m: res.metrics[m]["sqnr_db"]) == run.manifest["method"]
    rep = json.loads((tmp_path / "q" / "scales.json").read_text())
    assert rep["chosen_method"] == res.method


def _toml(case, tmp: Path, store: Path, *extra: str) -> Path:
    lines = ["[run]", 'name = "core"', f'store = "{store}"', "[model]", f'path = "{case["model"]}"', "[data]",
             f'calib = "{case["calib"]}"', f'eval = "{case["eval"]}"', "batch_size = 8", *extra]
    p = tmp / "c.toml"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_missed_target_writes_every_artifact_and_is_not_failed(case, tmp_path, capsys):
    store = tmp_path / "store"
    cfg = _toml(case, tmp_path, store, "[calibrate]", 'primary = "minmax"', "[target]", 'metric = "sqnr:200"',
                "max_float_nodes = 1")
    assert main(["run", str(cfg)]) == 1
    out, err = capsys.readouterr()
    run = RunStore(store).runs()[0]
    assert run.status == "target-missed" and run.is_complete and "failed" not in out
    assert f"run {run.id}: target-missed" in out and "target sqnr:200 not met" in err
    for key in ("model", "advise", "cache", "scales", "report"):
        assert run.artifact(key).exists(), key
        assert str(run.artifact(key)) in out, key  # the CLI prints where everything is
    adv = json.loads(run.artifact("advise").read_text())
    assert adv["met"] is False and adv["n_float_nodes"] == run.manifest["metrics"]["float_nodes"]
    assert run.manifest["metrics"]["target_met"] is False
    # advise's figure is on the selection samples, the shipped model's on the evaluation data (never the same set)
    assert run.manifest["metrics"]["advised_metric"] is not None and "sqnr_db" in run.manifest["metrics"]
    # the model written is the one advise kept, with its float nodes (no Q/DQ in front of them)
    q = onnx.load(str(run.artifact("model")))
    for node in adv["exclude"]:
        n = next(n for n in q.graph.node if n.name == node)
        assert not any(i.endswith("DequantizeLinear") or "_dq" in i.lower() for i in n.input[:1])
    # and quantize does the same: every file written, then exit 1
    o = tmp_path / "q.onnx"
    rc = main(["quantize", str(case["model"]), "--data", str(case["calib"]), "--eval-data", str(case["eval"]),
               "-m", "minmax", "--target", "sqnr:200", "--max-float-nodes", "1", "-o", str(o),
               "--cache", str(tmp_path / "q.cache"), "-b", "8"])
    assert rc == 1 and o.exists() and (tmp_path / "q.cache").exists() and (tmp_path / "q.advice.json").exists()


def test_cache_leaves_out_what_the_shipped_model_keeps_float(case, tmp_path):
    from calib.export import read_cache
    from calib.export.trt_cache import qdq_activation_scales

    out = tmp_path / "m.onnx"
    with pytest.raises(TargetNotMet) as e:
        quantize(case["model"], case["calib"], out, method="entropy", eval_data=case["eval"], target="sqnr:200",
                 cache=tmp_path / "m.cache", batch_size=8, max_float_nodes=2)
    adv = e.value.result.advice
    assert adv.exclude  # at least one node in float
    fm = load_model(case["model"])
    floats = {n.name: n for n in fm.graph.node if n.name in adv.exclude}
    cache = read_cache(tmp_path / "m.cache")
    quantized = qdq_activation_scales(onnx.load(str(out)))
    activations = set(fm.producers) | {i.name for i in fm.inputs}
    for n in floats.values():  # TensorRT <= 10 keeps a layer out of INT8 when its input has no range
        for i in n.input:
            if i in activations and i not in quantized:
                assert i not in cache.tensors, (n.name, i)
    qdq_amax = e.value.result.advice.qdq.amax
    for t, r in cache.tensors.items():
        if t in quantized:  # exactly the written QuantizeLinear's scale (float16 values: the default remainder)
            assert np.float32(r.amax / 127) == np.float32(quantized[t]), t
        if t in qdq_amax:  # the amax the Q/DQ model was exported with, to FP16 rounding of its scale
            assert r.amax == pytest.approx(qdq_amax[t], rel=1e-3)


@pytest.mark.parametrize("strategy", ["random", "kcenter"])
def test_run_with_a_sampling_section(case, tmp_path, strategy):
    store = tmp_path / "store"
    cfg = _toml(case, tmp_path, store, "[sampling]", f'strategy = "{strategy}"', "n = 12", "seed = 1",
                "[calibrate]", 'methods = ["minmax"]', 'primary = "minmax"', "[compare]", "html = false")
    assert main(["run", str(cfg)]) == 0
    run = RunStore(store).runs()[0]
    sub = json.loads(run.artifact("subset").read_text())
    assert sub["strategy"] == strategy and len(sub["ids"]) == 12 and len(set(sub["ids"])) == 12
    assert run.manifest["n_samples"] == 12
    # the statistics are those of exactly the chosen samples: minmax of a plain numpy pass over them
    x = np.load(case["calib"])["x"]
    idx = [int(i) for i in sub["indices"]]
    ranges = json.loads(run.artifact("ranges").read_text())
    assert ranges["methods"]["minmax"]["x"]["amax"] == pytest.approx(float(np.abs(x[idx]).max()), rel=1e-6)


def test_quantize_stats_out_is_what_collect_writes_and_export_reuses(case, tmp_path):
    from calib.stats import ActivationStats

    a, s = tmp_path / "a.onnx", tmp_path / "s.npz"
    assert main(["quantize", str(case["model"]), "--data", str(case["calib"]), "-o", str(a), "-m", "mse",
                 "--stats-out", str(s)]) == 0
    assert main(["collect", str(case["model"]), "--data", str(case["calib"]), "-o", str(tmp_path / "c.npz")]) == 0
    mine, ref = ActivationStats.load(s), ActivationStats.load(tmp_path / "c.npz")
    assert list(mine.tensors) == list(ref.tensors)
    for t, h in ref.tensors.items():
        m = mine.tensors[t]
        np.testing.assert_array_equal(m.pos, h.pos)
        np.testing.assert_array_equal(m.neg, h.neg)
        assert (m.exp, m.min, m.max, m.n) == (h.exp, h.min, h.max, h.n)
    b = tmp_path / "b.onnx"
    assert main(["export", str(case["model"]), "--stats", str(s), "-m", "mse", "-o", str(b)]) == 0
    assert _sha(a) == _sha(b)


def _overflowing_model(path: Path) -> None:
    """x[N,4] -> MatMul -> h -> Mul(1e38) -> m (inf where |h| > 3.4) -> MatMul -> y."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    inits = [models._init("w1", rng.normal(0, 2, (4, 8)).astype(np.float32)),
             models._init("big", np.array(1e38, np.float32)),
             models._init("w2", rng.normal(0, 1, (8, 3)).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Mul", ["h", "big"], ["m"], name="overflow"),
             helper.make_node("MatMul", ["m", "w2"], ["y"], name="mm2")]
    onnx.save(models._model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits, "overflow"),
              str(path))


def test_nonfinite_tensors_stay_float_in_quantize_as_in_export(tmp_path):
    """The NaN/inf policy of ``calib export --stats`` holds on ``quantize`` (and so on run and dashboard)."""
    model, data = tmp_path / "o.onnx", tmp_path / "d.npz"
    _overflowing_model(model)
    np.savez(data, x=np.random.default_rng(1).normal(0, 1, (16, 4)).astype(np.float32))
    a, s, rep = tmp_path / "a.onnx", tmp_path / "s.npz", tmp_path / "scales.json"
    assert main(["quantize", str(model), "--data", str(data), "-o", str(a), "-m", "minmax",
                 "--stats-out", str(s), "--report", str(rep)]) == 0
    from calib.stats import ActivationStats

    assert ActivationStats.load(s).tensors["m"].n_nonfinite > 0  # the case is what it claims
    b = tmp_path / "b.onnx"
    assert main(["export", str(model), "--stats", str(s), "-m", "minmax", "-o", str(b)]) == 0
    assert _sha(a) == _sha(b)
    from calib.export.trt_cache import qdq_activation_scales

    quantized = qdq_activation_scales(onnx.load(str(a)))  # through the FP16 remainder's input Cast
    assert "x" in quantized and "m" not in quantized
    assert "m" not in {r["tensor"] for r in json.loads(rep.read_text())["activations"]}


def test_runs_table_has_one_metric_per_column_and_fits(case, tmp_path, capsys, monkeypatch):
    store = tmp_path / "store"
    execute(_cfg(case, store, "minmax"), store=RunStore(store))
    capsys.readouterr()
    assert main(["runs", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100
    met = RunStore(store).runs()[0].manifest["metrics"]
    assert "SQNR" in out and "=" not in out  # one metric per column, no "k=v, k=v" cells
    for k in ("sqnr_db", "top1_agreement", "output_cosine"):
        assert f"{met[k]:.4g}" in out, k
    assert main(["show", RunStore(store).runs()[0].id, "--store", str(store)]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[1].startswith("  shipped model: ") and shown[2].startswith("  path: minmax")


def test_auto_run_with_html_reports_writes_them(case, tmp_path):
    """The demo's configuration (auto, every method's report, HTML): the reports plot the named methods'
    thresholds (auto's per-tensor mix has none) and the run completes."""
    store = tmp_path / "store"
    run = execute(_cfg(case, store, "auto", html=True, all_methods=True), store=RunStore(store))
    assert run.status == "complete" and run.manifest["method"] == "auto"
    assert "Histogram:" in run.artifact("report").read_text()
    from calib.cli.pipeline import _compared_methods  # the demo's table: the shipped model, then each method

    rows = _compared_methods(run)
    assert set(rows) == set(DEFAULT_METHODS) | {"auto"}
    for label, task in rows.items():
        ref = task_metrics(compare(load_model(case["model"]), onnx.load(str(run.artifact(f"qdq:{label}"))),
                                   open_source(case["eval"], load_model(case["model"])), batch_size=8, layers=False))
        assert task["cosine"] == pytest.approx(ref["cosine"], rel=1e-9), label
