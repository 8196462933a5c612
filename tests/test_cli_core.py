"""``calib collect`` / ``calib calibrate`` through ``calib.cli.main`` (in-process) and one console-script run."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import models
import numpy as np
import onnx
import pytest

from calib.calibrate import METHODS
from calib.cli import main
from calib.collect import collect
from calib.data import NpzSource
from calib.model import load_model
from calib.stats import ActivationStats

BAD = Path(__file__).parent / "bad_inputs"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture()
def cnn(tmp_path):
    model = tmp_path / "cnn.onnx"
    onnx.save(models.cnn_residual(), str(model))
    rng = np.random.default_rng(0)
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.normal(0, 1, (11, 3, 16, 16)).astype(np.float32), labels=np.arange(11) % 4)
    return model, data


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_collect_then_calibrate_all_methods(tmp_path, cnn, capsys):
    model, data = cnn
    before = sha256(model)
    stats_path, ranges_path = tmp_path / "stats.npz", tmp_path / "ranges.json"
    code, out, err = run(capsys, "collect", model, "--data", data, "-o", stats_path, "--batch-size", "4")
    assert code == 0, err
    assert sha256(model) == before
    assert f"collected {len(load_model(model).activation_tensors())} tensors over 11 samples" in out
    stats = ActivationStats.load(stats_path)
    m = load_model(model)
    assert stats.equals(collect(m, NpzSource(data, m.inputs), batch_size=4))

    code, out, err = run(capsys, "calibrate", stats_path, "--method", "all", "-o", ranges_path, "--model", model)
    assert code == 0, err
    assert sha256(model) == before
    doc = json.loads(ranges_path.read_text())
    assert set(doc["methods"]) == set(METHODS)
    for method, tensors in doc["methods"].items():
        assert set(tensors) == set(stats.tensors), method
        for t, v in tensors.items():
            assert v["amax"] > 0 and v["scale"] == v["amax"] / 127
    assert doc["methods"]["minmax"]["x"]["amax"] == float(np.abs(np.load(data)["x"]).max())
    w1 = onnx.numpy_helper.to_array(next(t for t in models.cnn_residual().graph.initializer if t.name == "w1"))
    assert doc["weights"]["conv1"]["axis"] == 0
    np.testing.assert_array_equal(doc["weights"]["conv1"]["amax"], np.abs(w1).max(axis=(1, 2, 3)))


def test_calibrate_method_list_and_limit(tmp_path, cnn, capsys):
    model, data = cnn
    stats_path, ranges_path = tmp_path / "s.npz", tmp_path / "r.json"
    assert run(capsys, "collect", model, "-d", data, "-o", stats_path, "--limit", "5")[0] == 0
    assert ActivationStats.load(stats_path).n_samples == 5
    code, out, err = run(capsys, "calibrate", stats_path, "-m", "percentile:99.9,entropy", "-o", ranges_path)
    assert code == 0, err
    assert list(json.loads(ranges_path.read_text())["methods"]) == ["percentile:99.9", "entropy"]
    code, _, err = run(capsys, "calibrate", stats_path, "-m", "entropi", "-o", ranges_path)
    assert code == 2 and "unknown calibration method 'entropi'" in err and "did you mean 'entropy'" in err


def test_calibrate_refuses_stats_of_another_model(tmp_path, cnn, capsys):
    model, data = cnn
    other = tmp_path / "other.onnx"
    onnx.save(models.cnn_residual(seed=1), str(other))
    stats_path = tmp_path / "s.npz"
    assert run(capsys, "collect", model, "-d", data, "-o", stats_path)[0] == 0
    code, _, err = run(capsys, "calibrate", stats_path, "-o", tmp_path / "r.json", "--model", other)
    assert code == 2 and "statistics were collected on another model" in err


# ---- bad inputs: tests/bad_inputs/core_*/ hold the input and the expected error text ---------------
CASES = {
    "core_missing_file": lambda d, mlp: ["collect", d / "missing.onnx", "--data", d / "data.npz"],
    "core_not_onnx": lambda d, mlp: ["collect", d / "model.onnx", "--data", d / "data.npz"],
    "core_truncated_protobuf": lambda d, mlp: ["collect", d / "model.onnx", "--data", d / "data.npz"],
    "core_external_data_outside": lambda d, mlp: ["collect", d / "model.onnx", "--data", d / "data.npz"],
    "core_data_wrong_name": lambda d, mlp: ["collect", mlp, "--data", d / "data.npz"],
    "core_data_wrong_shape": lambda d, mlp: ["collect", mlp, "--data", d / "data.npz"],
    "core_data_wrong_dtype": lambda d, mlp: ["collect", mlp, "--data", d / "data.npz"],
    "core_data_empty": lambda d, mlp: ["collect", mlp, "--data", d / "data.npz"],
    "core_data_nan": lambda d, mlp: ["collect", mlp, "--data", d / "data.npz"],
    "core_data_object_array": lambda d, mlp: ["collect", mlp, "--data", d / "data.npz"],
}


def test_every_core_bad_input_folder_has_a_case():
    assert sorted(p.name for p in BAD.glob("core_*") if p.is_dir()) == sorted(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, tmp_path, capsys):
    folder = BAD / case
    expected = (folder / "expected.txt").read_text().strip()
    mlp = tmp_path / "mlp.onnx"
    onnx.save(models.gemm_mlp(), str(mlp))
    inputs = [p for p in folder.iterdir() if p.is_file()] + [mlp]
    before = {p: sha256(p) for p in inputs}
    out_file = tmp_path / "stats.npz"
    code, out, err = run(capsys, *CASES[case](folder, mlp), "-o", out_file)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("calib: error:")]
    assert len(errors) == 1 and expected in errors[0], err
    assert "Traceback" not in err
    assert not out_file.exists() and not list(tmp_path.glob("*.tmp*"))
    assert {p: sha256(p) for p in inputs} == before  # nothing touched, nothing lost


def test_stats_file_that_is_not_stats(tmp_path, capsys):
    bogus = tmp_path / "stats.npz"
    np.savez(bogus, x=np.zeros(3))
    code, _, err = run(capsys, "calibrate", bogus, "-o", tmp_path / "r.json")
    assert code == 2 and "not a calib statistics file" in err


# ---- the console script ---------------------------------------------------------------------------
def test_console_script(tmp_path, cnn):
    model, data = cnn
    exe = Path(sys.executable).with_name("calib")
    assert exe.exists(), "pip install -e . installs the 'calib' console script"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    helped = subprocess.run([exe, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert helped.returncode == 0 and "collect" in helped.stdout and "calibrate" in helped.stdout
    stats_path = tmp_path / "stats.npz"
    done = subprocess.run([exe, "collect", model, "--data", data, "-o", stats_path], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert ActivationStats.load(stats_path).n_samples == 11
    failed = subprocess.run([exe, "collect", tmp_path / "nope.onnx", "--data", data, "-o", stats_path],
                            capture_output=True, text=True, env=env, timeout=120)
    assert failed.returncode == 2
    assert failed.stderr.splitlines()[0] == f"calib: error: {tmp_path / 'nope.onnx'}: no such file"


def test_negative_time_budget_is_refused_and_writes_nothing(tmp_path, cnn, capsys):
    model, data = cnn
    for argv in (["quantize", model, "--data", data, "-o", tmp_path / "q.onnx"],
                 ["advise", model, "--data", data, "--target", "cosine:0.9", "-o", tmp_path / "q.onnx"]):
        code, _, err = run(capsys, *map(str, argv), "--time-budget", "-5")
        assert code == 2 and "--time-budget" in err and "greater than or equal to 0" in err, err
    assert not (tmp_path / "q.onnx").exists()


def test_negative_time_budget_in_a_config_is_refused(tmp_path, cnn):
    from calib.config import load_config
    from calib.errors import ConfigError

    model, data = cnn
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[model]\npath = "{model}"\n[data]\ncalib = "{data}"\n[target]\ntime_budget_s = -1.0\n')
    with pytest.raises(ConfigError, match="time_budget_s must be >= 0"):
        load_config(cfg)
