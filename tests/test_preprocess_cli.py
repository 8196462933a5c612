"""Preprocessing you can see and set: collect/quantize/compare/export print the spec in use (and why),
``--preprocess SPEC.json`` is honoured, and the spec travels in the Q/DQ model's metadata."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from calib.cli import main
from calib.data.preprocess import METADATA_KEY, PreprocessSpec, spec_of_model
from calib.stats import ActivationStats
from tests.models import cnn_residual, save


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    model = save(cnn_residual(size=16), root / "m.onnx")
    rng = np.random.default_rng(0)
    for k in range(6):
        p = root / "imgs" / str(k % 2) / f"i{k}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(p)
    spec = PreprocessSpec(resize=(16, 16), channels="BGR", scale=1 / 255, mean=(0.5, 0.5, 0.5), std=(0.25,) * 3)
    spec.save(root / "spec.json")
    return {"root": root, "model": model, "imgs": root / "imgs", "spec": spec, "spec_path": root / "spec.json"}


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out + err


def _reference_output_max(model: str, files, spec: PreprocessSpec) -> float:
    """max of the model output over the images preprocessed by hand with numpy (not calib's code)."""
    s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    top = -np.inf
    for f in files:
        a = np.asarray(Image.open(f).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR), np.float32)
        a = (a[:, :, ::-1] * (1 / 255) - 0.5) / 0.25
        out = s.run(None, {"x": a.transpose(2, 0, 1)[None].astype(np.float32)})[0]
        top = max(top, float(out.max()))
    return top


def test_collect_prints_the_guess_and_honours_a_spec_file(case, capsys, tmp_path):
    code, out = run(capsys, "collect", case["model"], "--data", case["imgs"], "-o", tmp_path / "g.npz")
    assert code == 0, out
    line = next(x for x in out.splitlines() if x.startswith("preprocess (calibration data):"))
    assert "[guessed:" in line and "RGB NCHW" in line
    code, out = run(capsys, "collect", case["model"], "--data", case["imgs"], "-o", tmp_path / "s.npz",
                    "--preprocess", case["spec_path"], "--batch-size", "1")
    assert code == 0, out
    line = next(x for x in out.splitlines() if x.startswith("preprocess (calibration data):"))
    assert f"[from {case['spec_path']}]" in line and "resize 16x16" in line and "BGR NCHW" in line
    st = ActivationStats.load(tmp_path / "s.npz")
    out_name = onnx.load(case["model"]).graph.output[0].name
    files = sorted(case["imgs"].rglob("*.png"))
    ref = _reference_output_max(case["model"], files, case["spec"])
    assert st.tensors[out_name].max == pytest.approx(ref, rel=1e-5)
    assert ActivationStats.load(tmp_path / "g.npz").tensors[out_name].max != pytest.approx(ref, rel=1e-5)


def test_quantize_stamps_the_spec_and_compare_reuses_it(case, capsys, tmp_path):
    q = tmp_path / "q.onnx"
    code, out = run(capsys, "quantize", case["model"], "--data", case["imgs"], "-o", q,
                    "--preprocess", case["spec_path"])
    assert code == 0, out
    assert f"[from {case['spec_path']}]" in out
    proto = onnx.load(q)
    assert METADATA_KEY in {p.key for p in proto.metadata_props}
    assert spec_of_model(proto) == case["spec"]  # equality ignores the notes
    code, out = run(capsys, "compare", case["model"], q, "--data", case["imgs"], "-o", tmp_path / "c.json")
    assert code == 0, out
    line = next(x for x in out.splitlines() if x.startswith("preprocess (evaluation data):"))
    assert "from the model metadata" in line and "resize 16x16" in line


def test_export_bias_data_prints_and_stamps_the_spec(case, capsys, tmp_path):
    st = tmp_path / "st.npz"
    assert run(capsys, "collect", case["model"], "--data", case["imgs"], "-o", st,
               "--preprocess", case["spec_path"])[0] == 0
    q = tmp_path / "q.onnx"
    code, out = run(capsys, "export", case["model"], "--stats", st, "-o", q, "--bias-data", case["imgs"],
                    "--preprocess", case["spec_path"])
    assert code == 0, out
    assert "preprocess (bias data):" in out and "resize 16x16" in out
    assert spec_of_model(onnx.load(q)) == case["spec"]


def test_a_bad_spec_file_is_one_clear_error(case, capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "calib.preprocess", "version": 1, "colour": "RGB"}')
    code, out = run(capsys, "collect", case["model"], "--data", case["imgs"], "-o", tmp_path / "x.npz",
                    "--preprocess", bad)
    assert code == 2 and f"{bad}: unknown key 'colour'" in out
