"""The CLI contract, tested on the real ``calib`` console script in subprocesses (what a user gets):
usage errors exit 2 with ONE line and no traceback; SIGINT exits 130, SIGTERM 143.

``.ci/contract`` runs this module in a fresh venv holding only ``pip install .`` and pytest, against the newest
typer (and friends) pip resolves, so a dependency upgrade that breaks the contract fails CI.
Set ``CALIB_EXE`` to the console script to test (default: ``calib`` beside this Python, else ``python -m calib``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _calib() -> list[str]:
    exe = os.environ.get("CALIB_EXE")
    if exe:
        return [exe]
    return [sys.executable, "-m", "calib"]  # this checkout (the venv's console script may import another one)


def _env() -> dict:
    env = dict(os.environ)
    if not os.environ.get("CALIB_EXE"):
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*_calib(), *args], capture_output=True, text=True, timeout=120, env=_env(), cwd=cwd)


@pytest.mark.parametrize("args, text", [
    (["collect", "--bogus"], "No such option"),
    (["collect", "m.onnx", "--data", "d.npz"], "Missing option"),
    (["collect", "m.onnx", "--data", "d.npz", "-o", "s.npz", "--batch-size", "abc"], "--batch-size"),
    (["nosuch"], "No such command"),
    (["--nope"], "No such option"),
])
def test_usage_errors_exit_2_in_one_line(args, text):
    r = _run(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("calib: usage:") and text in lines[0], r.stderr


def test_bad_input_exits_2_in_one_line(tmp_path):
    (tmp_path / "m.onnx").write_text("not a model")
    r = _run("collect", "m.onnx", "--data", "d.npz", "-o", "s.npz", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("calib: error:")]) == 1


def test_help_exits_0():
    r = _run("--help")
    assert r.returncode == 0 and "collect" in r.stdout


def test_version_exits_0_with_the_installed_version():
    from importlib.metadata import version

    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"calib {version('calib')}", r.stdout + r.stderr


def _big_case(tmp_path: Path) -> list[str]:
    """A collect that runs for a while (many one-sample batches) on a tiny hand-built MLP."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((10, 10), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                           helper.make_node("Relu", ["h"], ["y"], name="r")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "d.npz", x=np.zeros((200000, 10), np.float32))
    return ["collect", "m.onnx", "--data", "d.npz", "-o", "s.npz", "--batch-size", "1"]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_exit_130_and_143(sig, code, tmp_path):
    p = subprocess.Popen([*_calib(), *_big_case(tmp_path)], stderr=subprocess.PIPE, text=True, env=_env(),
                         cwd=tmp_path)
    try:
        for line in p.stderr:  # wait until the command is collecting
            if "collect:" in line:
                break
        p.send_signal(sig)
        rest = p.stderr.read()
        assert p.wait(timeout=60) == code, rest
    finally:
        if p.poll() is None:
            p.kill()
    assert "Traceback" not in rest
    assert not (tmp_path / "s.npz").exists()
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".s.npz")]  # no temp file left


def test_installed_metadata_declares_what_the_cli_imports():
    from importlib import metadata

    try:
        reqs = metadata.requires("calib") or []
    except metadata.PackageNotFoundError:
        pytest.skip("calib is not installed here (run via .ci/contract)")
    names = {r.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip().lower() for r in reqs}
    assert {"typer", "numpy", "onnx", "onnxruntime", "polygraphy", "rich", "tqdm"} <= names
