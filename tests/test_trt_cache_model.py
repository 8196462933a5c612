"""The calibration cache describes the written Q/DQ model (issue 17): read it back and compare with the model."""

from __future__ import annotations

import json
import struct

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from calib.cli import main
from calib.export import read_cache
from tests import models


def _q_scales(path) -> dict[str, float]:
    """Reference: the scale of every activation QuantizeLinear, read directly from the file."""
    m = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    cast_src = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "Cast"}
    out = {}
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
            src = cast_src.get(n.input[0], n.input[0])
            out[src] = float(np.float32(inits[n.input[1]]))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    model = tmp / "cnn.onnx"
    models.save(models.cnn_residual(), model)
    data = tmp / "calib.npz"
    np.savez(data, x=np.random.default_rng(3).standard_normal((8, 3, 16, 16)).astype(np.float32))
    stats = tmp / "stats.npz"
    assert main(["-q", "collect", str(model), "--data", str(data), "-o", str(stats)]) == 0
    return model, stats, tmp


@pytest.mark.parametrize("exclude, target", [([], None), (["fc"], None), (["conv2"], None), (["fc"], "trt")])
def test_cache_holds_each_quantize_linear_scale(setup, exclude, target):
    model, stats, tmp = setup
    tag = f"{''.join(exclude)}{target}"
    out, cache, report = tmp / f"m{tag}.onnx", tmp / f"m{tag}.cache", tmp / f"s{tag}.json"
    args = ["-q", "export", str(model), "--stats", str(stats), "-o", str(out), "--cache", str(cache),
            "--trt-version", "100900", "--report", str(report)] + (["--target-runtime", target] if target else [])
    for x in exclude:
        args += ["--exclude", x]
    assert main(args) == 0
    text = cache.read_text()
    assert text.splitlines()[0] == "TRT-100900-EntropyCalibration2"
    ranges = read_cache(cache)
    written = _q_scales(out)
    assert written, "the model quantizes something"
    for t, scale in written.items():
        hexed = [ln for ln in text.splitlines() if ln.startswith(f"{t}: ")]
        assert hexed == [f"{t}: {struct.pack('>f', scale).hex()}"], t
        assert np.float32(ranges[t].amax / 127) == np.float32(scale)
    fp32 = onnx.load(str(model))
    kept_float_inputs = {i for n in fp32.graph.node if n.name in exclude for i in n.input} - set(written)
    kept_float_inputs -= {t.name for t in fp32.graph.initializer}
    if "fc" in exclude:
        assert kept_float_inputs == {"flat"}
    for t in kept_float_inputs:
        assert t not in ranges, f"{t} feeds a node kept in float; TensorRT 10 would run it in INT8"
    # the scale report describes the same written model
    doc = json.loads(report.read_text())
    assert {a["tensor"]: a["scale"] for a in doc["activations"]} == pytest.approx(written, rel=0, abs=0)
    if target == "trt":  # fp16 remainder: scales are float16 values, graph input quantized through a Cast
        m = onnx.load(str(out))
        assert any(n.op_type == "Cast" for n in m.graph.node)
        assert all(float(np.float16(v)) == v for v in written.values())
    # layer outputs implicit INT8 needs are still there (Conv outputs are not Q/DQ-quantized under trt placement)
    assert "c1" in ranges and "c1" not in written
