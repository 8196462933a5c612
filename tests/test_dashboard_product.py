"""The dashboard does the job: every run option, the shipped model with downloads, jobs seen from any session,
per-sample signals of the calibration set (Streamlit's AppTest on a real demo run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("streamlit", reason="the dashboard needs streamlit (pip install 'calib[app]')")

from dashboard_run import copy_store, shared_store  # noqa: E402
from test_dashboard import app, frame, goto, texts, wait_for  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    src, pages = shared_store(tmp_path_factory)
    store = copy_store(src, tmp_path_factory.mktemp("dash-product") / "store")
    return {"store": store, "pages": pages, "run": next(d for d in store.iterdir() if d.is_dir())}


def test_runs_page_shows_the_shipped_model_with_downloads(demo, monkeypatch):
    at = app(demo["store"], monkeypatch)
    assert f"Shipped model of {demo['run'].name}" in [h.value for h in at.header]
    labels = [b.proto.label for b in at.get("download_button")]
    assert "Q/DQ model (.onnx)" in labels and "scales.json" in labels
    facts = dict(zip(at.table[0].value[""], at.table[0].value["value"]))
    m = json.loads((demo["run"] / "run.json").read_text())
    assert facts["method"] == m["method"] and facts["calibration samples"] == str(m["n_samples"])
    assert "no advise in this run" in texts(at)


def test_new_run_with_every_option_and_its_progress_in_a_second_session(demo, monkeypatch):
    at = app(demo["store"], monkeypatch)
    model = json.loads((demo["run"] / "run.json").read_text())["model"]["path"]
    at.text_input(key="nr_model").set_value(model)
    at.text_input(key="nr_calib").set_value(str(demo["pages"] / "calib"))
    at.text_input(key="nr_eval").set_value(str(demo["pages"] / "eval"))
    at.text_input(key="nr_name").set_value("every-option")
    at.multiselect(key="nr_methods").set_value(["entropy", "minmax"])
    at.selectbox(key="nr_primary").set_value("best")
    at.text_input(key="nr_target").set_value("top1:0.5")
    at.selectbox(key="nr_runtime").set_value("ort")
    at.number_input(key="nr_batch").set_value(4)
    at.selectbox(key="nr_pp_mode").set_value("spec as JSON text")
    spec = {"format": "calib.preprocess", "version": 1, "resize": [224, 224], "channels": "BGR",
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    at.text_area(key="nr_pp").set_value(json.dumps(spec))
    at.button[-1].click().run()
    assert not at.error, [e.value for e in at.error]
    second = app(demo["store"], monkeypatch)  # another session: it sees the job from its progress file
    assert "1 job(s) running in this store" in texts(second)
    bars = [p.proto.text for p in second.get("progress")]
    assert any(b.startswith("run every-option: ") for b in bars), bars
    wait_for(at, lambda a: any(s.value.endswith("finished") for s in a.success), timeout=400)
    rid = next(s.value for s in at.success if s.value.endswith("finished")).split()[1]
    new = demo["store"] / rid
    cfg = json.loads((new / "config.json").read_text())
    assert (cfg["primary"], cfg["target"], cfg["placement"], cfg["batch_size"]) == ("best", "top1:0.5", "ort", 4)
    assert cfg["high_precision"] == "fp32"  # the ONNX Runtime target's remainder
    assert cfg["preprocess"]["resize"] == [224, 224] and cfg["preprocess"]["channels"] == "BGR"
    assert (new / "advise.json").exists() and (new / "COMPLETE").exists()
    assert json.loads((new / "preprocess.json").read_text())["channels"] == "BGR"


@pytest.mark.parametrize("runtime, high, want", [("trt", "", ("trt", "fp16")), ("ort", "", ("ort", "fp32")),
                                                 ("trt", "fp32", ("trt", "fp32")), ("ort", "bf16", ("ort", "bf16"))])
def test_new_run_form_target_runtime_and_remainder_follow_the_cli_rule(tmp_path, monkeypatch, runtime, high, want):
    """The form's target runtime / high-precision fields give the RunConfig that --target-runtime /
    --high-precision give (calib.export.precision.resolve_target): fp16 for TensorRT, fp32 for ORT, explicit wins."""
    import numpy as np

    from tests import models

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "apps"))
    monkeypatch.setenv("CALIB_STORE", str(tmp_path / "store"))
    new_run = __import__("new_run")
    model = models.save(models.gemm_mlp(), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=np.zeros((4, 10), np.float32))
    v = {"model": model, "name": "", "calib": str(tmp_path / "calib.npz"), "eval": "", "methods": ["minmax"],
         "primary": "minmax", "target": "", "max_float": 0, "budget": 0.0, "runtime": runtime,
         "high_precision": high, "exclude": "", "batch": 4, "bias": False, "cache": True, "html": False,
         "strategy": "", "size": 0, "pp_mode": new_run.PREPROCESS_MODES[0], "pp": ""}
    cfg = new_run.build_config(v)
    assert (cfg.placement, cfg.high_precision) == want
    auto = new_run.build_config({**v, "primary": "auto"})  # the form's default (PRIMARIES[0]), as the CLI's
    assert new_run.PRIMARIES[0] == "auto" and auto.primary == "auto" and auto.methods == ["minmax"]  # a chooser, not a method


def test_a_bad_target_is_refused_before_anything_starts(demo, monkeypatch):
    at = app(demo["store"], monkeypatch)
    at.text_input(key="nr_model").set_value(json.loads((demo["run"] / "run.json").read_text())["model"]["path"])
    at.text_input(key="nr_calib").set_value(str(demo["pages"] / "calib"))
    at.text_input(key="nr_target").set_value("top1:0.5")
    at.button[-1].click().run()
    assert any("method best and a target need evaluation data" in e.value for e in at.error)


def test_calibration_set_marks_the_samples_that_set_the_ranges(demo, monkeypatch):
    at = goto(app(demo["store"], monkeypatch), "calibration_set", demo["run"])
    at.button(key="cs_signals").click()
    wait_for(at, lambda a: "tensor ranges (max |x|): set by" in texts(a), timeout=300)
    at.radio(key="cs_view").set_value("table").run()
    t = frame(at, "ranges_set")
    n_tensors = int(texts(at).split(" tensor ranges (max |x|)")[0].split()[-1])
    page_sum = int(t["ranges_set"].sum())
    assert 0 < page_sum <= n_tensors and set(t["outlier"].unique()) <= {True, False}
