"""calib import-cache (issue 17): a calibration cache -> Q/DQ model; round trip, hand-written fixtures."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from calib.cli import main
from calib.errors import CacheFormatError
from calib.export.trt_cache import read_any_cache
from tests import models


def _q_scales(path) -> dict[str, np.float32]:
    """Reference: each activation QuantizeLinear's scale read from the file (through graph-input Casts)."""
    m = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    cast_src = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "Cast"}
    return {cast_src.get(n.input[0], n.input[0]): np.float32(inits[n.input[1]])
            for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imp")
    model = tmp / "cnn.onnx"
    models.save(models.cnn_residual(), model)
    np.savez(tmp / "calib.npz", x=np.random.default_rng(4).standard_normal((8, 3, 16, 16)).astype(np.float32))
    assert main(["-q", "collect", str(model), "--data", str(tmp / "calib.npz"), "-o", str(tmp / "s.npz")]) == 0
    return model, tmp / "s.npz", tmp


@pytest.mark.parametrize("exclude", [[], ["fc"]])
def test_round_trip_gives_the_same_scales(setup, exclude):
    model, stats, tmp = setup
    tag = "".join(exclude)
    orig, cache, back, rep = tmp / f"o{tag}.onnx", tmp / f"c{tag}.cache", tmp / f"b{tag}.onnx", tmp / f"r{tag}.json"
    xs = sum((["-x", e] for e in exclude), [])
    assert main(["-q", "export", str(model), "--stats", str(stats), "-o", str(orig), "--cache", str(cache)] + xs) == 0
    assert main(["-q", "import-cache", str(model), str(cache), "-o", str(back), "--report", str(rep)] + xs) == 0
    want, got = _q_scales(orig), _q_scales(back)
    assert want and got == want  # same tensors, bit-identical float32 scales
    doc = json.loads(rep.read_text())
    assert doc["model_lacks"] == []
    assert doc["cache_lacks"] == []  # the excluded node's input is not in the cache, and not wanted either
    assert ("flat" in read_any_cache(cache)) == (not exclude)
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa
    assert np.array_equal(run(orig), run(back))


HAND_TRT = """TRT-100900-EntropyCalibration2
x: 3c010204
c1: 3f800000
r1: 3e000000
res: 40000000
r2: 3f000000
gap: 3d800000
flat: 3d800000
(Unnamed Layer* 3) [Constant]_output: 3f800000
"""


def test_hand_written_trt_fixture_decodes_big_endian_hex(setup):
    model, stats, tmp = setup
    p = tmp / "hand.cache"
    p.write_text(HAND_TRT)
    out, rep = tmp / "hand.onnx", tmp / "hand.json"
    assert main(["-q", "import-cache", str(model), str(p), "-o", str(out), "--report", str(rep),
                 "--stats", str(stats), "--high-precision", "fp32"]) == 0
    s = _q_scales(out)
    # 3c010204 = 1/127 (float32), 3e000000 = 0.125, 3d800000 = 0.0625: big-endian IEEE-754 float32
    assert s["x"] == np.float32(1 / 127) and s["r1"] == np.float32(0.125) and s["flat"] == np.float32(0.0625)
    # the TensorRT default (fp16 remainder) holds the same scales rounded to float16
    assert main(["-q", "import-cache", str(model), str(p), "-o", str(tmp / "hand16.onnx")]) == 0
    assert _q_scales(tmp / "hand16.onnx")["x"] == float(np.float16(1 / 127))
    doc = json.loads(rep.read_text())
    assert doc["model_lacks"] == ["(Unnamed Layer* 3) [Constant]_output"]
    assert set(doc["cache_lacks"]) == set()  # c2 is not quantized by the trt placement, so nothing else needed
    verdicts = {r["tensor"]: r["verdict"] for r in doc["vs_stats"]}
    assert verdicts["x"] == "clips"  # amax 1.0 against standard normal data reaching |x| > 3


def test_cache_lacking_a_tensor_leaves_it_float(setup):
    model, _, tmp = setup
    p = tmp / "partial.cache"
    p.write_text("\n".join(ln for ln in HAND_TRT.splitlines() if not ln.startswith("r1:")) + "\n")
    out, rep = tmp / "partial.onnx", tmp / "partial.json"
    assert main(["-q", "import-cache", str(model), str(p), "-o", str(out), "--report", str(rep)]) == 0
    assert "r1" not in _q_scales(out)
    assert json.loads(rep.read_text())["cache_lacks"] == ["r1"]


def test_onnxruntime_table_formats(tmp_path):
    # text as onnxruntime.quantization.quant_utils.write_calibration_table writes it: '<key> <str(amax)>'
    (tmp_path / "calibration.cache").write_text("x 2.5\n/a b/out 0.75\n")
    r = read_any_cache(tmp_path / "calibration.cache")
    assert r["x"].amax == 2.5 and r["/a b/out"].amax == 0.75
    (tmp_path / "calibration.json").write_text(json.dumps({"x": {"lowest": -3.0, "highest": 2.0}}))
    assert read_any_cache(tmp_path / "calibration.json")["x"].amax == 3.0
    # flatbuffers written by ONNX Runtime's own writer (its TensorData objects)
    from onnxruntime.quantization.calibrate import TensorData
    from onnxruntime.quantization.quant_utils import write_calibration_table

    write_calibration_table({"x": TensorData(lowest=np.float32(-1.5), highest=np.float32(1.5)),
                             "y": TensorData(lowest=np.float32(0.0), highest=np.float32(4.0))}, dir=str(tmp_path))
    fb = read_any_cache(tmp_path / "calibration.flatbuffers")
    assert fb["x"].amax == 1.5 and fb["y"].amax == 4.0
    with pytest.raises(CacheFormatError, match="line 1"):
        (tmp_path / "bad.cache").write_text("x notanumber\n")
        read_any_cache(tmp_path / "bad.cache")
