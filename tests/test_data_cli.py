"""``calib sample`` and ``calib coverage`` in-process, on a small CNN and an .npz pool."""

from __future__ import annotations

import json

import numpy as np
import onnx

from calib.cli import main
from tests.models import cnn_residual


def _setup(tmp_path):
    onnx.save(cnn_residual(size=8), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (40, 3, 8, 8)).astype(np.float32)
    x[-2:] *= 6.0  # two rare, large inputs
    np.savez(tmp_path / "pool.npz", x=x, labels=np.arange(40) % 4)
    return tmp_path / "m.onnx", tmp_path / "pool.npz"


def test_sample_and_coverage(tmp_path, capsys):
    model, pool = _setup(tmp_path)
    assert main(["sample", str(pool), "--n", "8", "--strategy", "kcenter", "--model", str(model),
                 "-o", str(tmp_path / "s.json")]) == 0
    sub = json.loads((tmp_path / "s.json").read_text())
    assert sub["n"] == 8 and {38, 39} & set(sub["indices"]) and sub["ids"][0].startswith("pool.npz[")
    assert main(["sample", str(pool), "--n", "8", "--strategy", "stratified", "-o", str(tmp_path / "t.json")]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["label_counts"] == {"0": 2, "1": 2, "2": 2, "3": 2}
    rc = main(["coverage", str(pool), "--subset", str(tmp_path / "s.json"), "--model", str(model),
               "-o", str(tmp_path / "c.json"), "--html", str(tmp_path / "c.html")])
    assert rc == 0
    rep = json.loads((tmp_path / "c.json").read_text())
    pts = rep["curve"]["points"]
    assert [p["size"] for p in pts] == [4, 8, 16, 32, 40, 40] and pts[-1]["subset"] == "pool"
    assert all(0 <= p["top1_agreement"] <= 1 for p in pts)
    assert pts[-2]["top1_agreement"] == pts[-1]["top1_agreement"]  # the whole pool, two ways
    for r in rep["tensors"]:
        assert r["ratio"] == r["amax_subset"] / r["amax_pool"]
        assert 0 <= r["clipped_pool_fraction"] <= 1
    assert rep["class_balance"]["pool"] == [10, 10, 10, 10]
    assert "plotly" in (tmp_path / "c.html").read_text()


def test_n_larger_than_pool_exits_2(tmp_path, capsys):
    _, pool = _setup(tmp_path)
    assert main(["sample", str(pool), "--n", "41", "--strategy", "random", "-o", str(tmp_path / "s.json")]) == 2
    assert "asked for 41 samples but the pool holds only 40" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()
