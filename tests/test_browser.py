"""``calib dashboard`` in headless Chromium: every page, a drift analysis, drop a sample and re-calibrate,
land on the worst layer, start a run with a target, see its progress from a second session, download the model,
and open an HTML report offline.

Needs Debian's ``chromium`` (``/usr/bin/chromium``) and the ``playwright`` Python package (no browser download:
Playwright drives the system Chromium). Without them the tests skip, except in CI (``CI=true``), where they fail.

Starts the real CLI on a free loopback port against a copy of the session's demo
store, drives it with Playwright and saves a screenshot of each step under
``tests/_output/screenshots/``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from calib.drift_verdict import worst_layer

from dashboard_run import copy_store, free_port, shared_store, wait_http

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parent / "_output" / "screenshots"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run"]  # + a fresh --user-data-dir

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _missing(what: str) -> None:
    """Skip on a developer machine; fail in CI, where .ci/run installs Chromium so these tests always run."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"browser tests cannot run in CI: {what}", pytrace=False)
    pytest.skip(what)


def require_browser() -> None:
    if not CHROMIUM.exists():
        _missing(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("the playwright package is missing: pip install -e '.[dev]'")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_browser()
    src, pages = shared_store(tmp_path_factory)
    store = copy_store(src, tmp_path_factory.mktemp("dash-browser") / "store")
    port = free_port()
    calib = Path(sys.executable).parent / "calib"
    cmd = [str(calib)] if calib.exists() else [sys.executable, "-c", "from calib.cli import entry; entry()"]
    proc = subprocess.Popen([*cmd, "dashboard", "--store", str(store), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_http(f"{url}/_stcore/health", proc) == 200
        yield {"url": url, "store": store, "pages": pages, "run": next(d for d in store.iterdir() if d.is_dir())}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A persistent Chromium context on a fresh profile (``--user-data-dir``); each page is its own session."""
    require_browser()
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True,
            args=LAUNCH_ARGS, viewport={"width": 1400, "height": 1800}, accept_downloads=True)
        yield ctx
        ctx.close()


@pytest.fixture(scope="module")
def page(server, browser):
    pg = browser.pages[0] if browser.pages else browser.new_page()
    pg.set_default_timeout(60000)
    return pg


def _settle(pg) -> None:
    """Wait until Streamlit has finished running the script and drawn its tables and charts."""
    pg.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=60000)
    pg.wait_for_timeout(800)


def _open(pg, url: str, path: str, title: str) -> None:
    pg.goto(f"{url}/{path}")
    pg.get_by_role("heading", name=title).wait_for()
    _settle(pg)


def _shot(pg, name: str, full: bool = True) -> Path:
    out = SHOTS / f"{name}.png"
    pg.screenshot(path=str(out), full_page=full)
    assert out.stat().st_size > 10000
    return out


def test_every_page_renders_real_numbers(server, page):
    url, run = server["url"], server["run"]
    _open(page, url, "", "Runs")
    body = page.inner_text("body")
    assert "Runs" in body and "New run" in body
    page.locator('[data-testid="stDataFrame"]').first.wait_for()
    assert run.name in body  # the pick box shows the run
    _shot(page, "01-runs")

    _open(page, url, "layers", "Layers: drift through depth")
    assert "Worst layers" in page.inner_text("body")
    page.locator(".js-plotly-plot").first.wait_for(timeout=60000)  # plotly draws after the script has run
    assert page.locator(".js-plotly-plot").count() >= 1  # depth curves (a histogram only for calibrated tensors)
    body = page.inner_text("body")
    assert "local SQNR (dB, the layer alone in INT8) through depth" in body  # opens on where error enters
    assert "opened on the worst layer: lowest" in body and f"Layer {_worst_node(run)} (" in body
    _shot(page, "02-layers")

    _open(page, url, "data", "Data drift: calibration vs evaluation")
    page.get_by_role("button", name="Analyse drift").click()
    page.get_by_text("Evaluation samples least like the calibration set").wait_for(timeout=90000)
    _settle(page)
    body = page.inner_text("body")
    assert "24 calibration samples vs 16 evaluation samples" in body
    page.locator('[data-testid="stImage"]').nth(11).wait_for()  # thumbnails of the 12 most novel eval pages
    assert "Verdict:" in page.inner_text("body")
    _shot(page, "03-data-drift")

    _open(page, url, "compare_runs", "Compare runs")
    assert "Calibrated ranges" in page.inner_text("body")
    _shot(page, "05-compare-runs")


def test_drop_a_sample_and_recalibrate(server, page):
    url, store, run = server["url"], server["store"], server["run"]
    _open(page, url, "calibration_set", "Calibration set")
    assert page.locator('[data-testid="stImage"]').count() == 24
    _shot(page, "04-calibration-set")
    box = page.locator('[data-testid="stMultiSelect"]').filter(has_text="drop samples")
    box.locator("input").click()
    victim = "0/page_00002.jpg"
    box.locator("input").fill(victim)
    page.keyboard.press("Enter")
    page.keyboard.press("Escape")
    _settle(page)
    assert page.locator('[data-testid="stMetricValue"]').inner_text().strip() == "23"
    page.get_by_role("button", name="Re-calibrate with the edited set").click()
    done = page.get_by_text("The two runs side by side")
    failed = page.locator('[data-testid="stAlertContentError"]')
    done.or_(failed).first.wait_for(timeout=150000)
    _settle(page)
    assert failed.count() == 0, failed.first.inner_text()
    new = [d for d in store.iterdir() if d.is_dir() and not d.name.startswith(".") and d != run]
    assert len(new) == 1 and (new[0] / "COMPLETE").exists()
    ids = json.loads((new[0] / "calib_ids.json").read_text())
    assert len(ids) == 23 and victim not in ids
    body = page.inner_text("body")
    assert f"after: {new[0].name}" in body and "23 chosen ids" in body
    page.get_by_text("The two runs side by side").evaluate("e => e.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(300)
    _shot(page, "06-recalibrated", full=False)
    page.get_by_role("button", name="Open both in Compare runs").click()
    page.get_by_role("heading", name="Compare runs").wait_for()
    _settle(page)
    body = page.inner_text("body")
    assert run.name in body and new[0].name in body
    _shot(page, "07-compare-after-recalibration")


def test_report_opens_offline_with_its_shared_plotly_bundle(browser, tmp_path):
    from compare_graphs import calib_qdq, cnn_data, small_cnn

    from calib.compare import compare
    from calib.compare.html import write_html
    from calib.model import model_from_proto

    m = model_from_proto(small_cnn())
    src = cnn_data(8)
    stats, _, q = calib_qdq(m, src)
    path = write_html(tmp_path / "report.html", compare(m, q, src), stats=stats)
    pg = browser.new_page()
    pg.route("http*://**", lambda route: route.abort())  # offline: any network request fails
    pg.goto(path.as_uri())
    pg.wait_for_selector(".js-plotly-plot .main-svg", timeout=30000)
    assert pg.locator(".js-plotly-plot").count() >= 3
    pg.close()


def _worst_node(run: Path) -> str:
    method = json.loads((run / "run.json").read_text())["method"]
    rows = json.loads((run / f"compare.{method}.json").read_text())["layers"]
    return worst_layer(rows)[0]["node"]  # lowest local SQNR where the report has it (calib.drift_verdict)


def test_new_run_with_a_target_progress_elsewhere_and_download(server, page, browser, tmp_path):
    url, store, run, pages = server["url"], server["store"], server["run"], server["pages"]
    _open(page, url, "", "Runs")
    before = {d.name for d in store.iterdir()}
    model = json.loads((run / "run.json").read_text())["model"]["path"]
    page.get_by_label("FP32 ONNX model (path)").fill(model)
    page.get_by_label("run name (default: the model's file name)").fill("browser-target")
    page.get_by_label("calibration data (image folder, manifest .csv/.jsonl, .npz)").fill(str(pages / "calib"))
    page.get_by_role("textbox", name="evaluation data (needed for compare, best and a target)").fill(str(pages / "eval"))
    page.get_by_role("textbox", name="target (optional)").fill("top1:0.9")
    budget = page.get_by_label(re.compile(r"run time budget, s"))  # bounded, like a user in a hurry
    budget.fill("20")
    budget.press("Tab")  # commits the value; Enter would submit the form (start the run before `before` is read)
    page.get_by_role("button", name="Start run").click()

    other = browser.new_page()  # a second session, opened after the job started
    other.set_default_timeout(60000)
    _open(other, url, "", "Runs")
    other.get_by_text("job(s) running in this store").wait_for(timeout=60000)
    assert "run browser-target" in other.inner_text("body")
    _shot(other, "09-progress-second-session", full=False)
    other.close()

    done = page.locator('[data-testid="stAlertContentSuccess"]').filter(has_text=re.compile(r"run .*browser-target.* finished"))
    failed = page.locator('[data-testid="stAlertContentError"]')
    done.or_(failed).first.wait_for(timeout=300000)
    assert failed.count() == 0, failed.first.inner_text()
    made = [store / d for d in {d.name for d in store.iterdir()} - before if not d.startswith(".")]
    assert len(made) == 1, (sorted(d.name for d in store.iterdir()), page.inner_text("body")[-2000:])
    (new,) = made
    cfg = json.loads((new / "config.json").read_text())
    assert cfg["target"] == "top1:0.9" and (new / "advise.json").exists() and (new / "COMPLETE").exists()

    _open(page, url, "", "Runs")  # the newest run is opened: its shipped model can be downloaded
    page.get_by_text(f"Shipped model of {new.name}").wait_for()
    with page.expect_download() as dl:
        page.get_by_role("button", name="Q/DQ model (.onnx)").click()
    got = tmp_path / "downloaded.onnx"
    dl.value.save_as(got)
    assert got.read_bytes() == (new / "model.int8.onnx").read_bytes()
    _shot(page, "10-shipped-model")
