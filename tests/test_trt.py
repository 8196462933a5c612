"""TensorRT adapter. Engine builds run only where tensorrt imports (never faked)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from calib import trt as trt_adapter
from calib.errors import TensorRTUnavailable

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_trtexec_commands_for_qdq_model():
    lines = trt_adapter.trtexec_commands("model.int8.onnx", "model.engine")
    cmds = [line for line in lines if not line.startswith("#")]
    assert cmds == ["trtexec --onnx=model.int8.onnx --saveEngine=model.engine --stronglyTyped"]
    assert any("TensorRT 10 and 11" in line for line in lines)


def test_trtexec_commands_fp16_and_workspace_and_quoting():
    lines = trt_adapter.trtexec_commands("my model.onnx", "out.engine", fp16=True, workspace_bytes=2 << 30)
    cmds = [line for line in lines if not line.startswith("#")]
    assert cmds[0] == "trtexec --onnx='my model.onnx' --saveEngine=out.engine --memPoolSize=workspace:2048M " \
                      "--stronglyTyped"
    assert cmds[1].endswith("--int8 --fp16")


def test_trtexec_commands_for_cache():
    lines = trt_adapter.trtexec_commands("fp32.onnx", "model.engine", cache="model.cache")
    cmds = [line for line in lines if not line.startswith("#")]
    assert cmds == ["trtexec --onnx=fp32.onnx --int8 --calib=model.cache --saveEngine=model.engine"]
    assert any("TensorRT 11 removed --int8 and --calib" in line for line in lines)


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here; the unavailable path cannot be exercised")
def test_unavailable_tensorrt_raises_import_error_with_reason(tmp_path):
    with pytest.raises(TensorRTUnavailable) as e:
        trt_adapter.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine")
    assert isinstance(e.value, ImportError)
    assert "tensorrt does not import here" in str(e.value) and "ModuleNotFoundError" in str(e.value)
    assert e.value.hint and "trtexec" in e.value.hint
    assert not (tmp_path / "m.engine").exists()
    with pytest.raises(TensorRTUnavailable):
        trt_adapter.build_engine_from_cache(tmp_path / "m.onnx", b"TRT-100300-EntropyCalibration2\n",
                                            tmp_path / "m.engine")


# ---------------------------------------------------------------- real TensorRT only


def _qdq_model(tmp_path):
    from calib.calibrate.base import Ranges, TensorRange
    from calib.export import export_qdq
    from calib.model import model_from_proto

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16, 16])],
                          [numpy_helper.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32), "W")])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    q = export_qdq(model_from_proto(proto), Ranges("minmax", {"x": TensorRange(4.0, "minmax")}))
    fp32 = tmp_path / "fp32.onnx"
    fp32.write_bytes(proto.SerializeToString())
    return q.save(tmp_path / "model.int8.onnx"), fp32


def test_build_engine_from_qdq(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (needs an NVIDIA GPU); build tests skipped")
    qdq, _ = _qdq_model(tmp_path)
    out = trt_adapter.build_engine(qdq, tmp_path / "model.engine", workspace_bytes=1 << 28)
    assert out.stat().st_size > 0


def test_build_engine_from_cache_trt10(tmp_path):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (needs an NVIDIA GPU); build tests "
                                                 "skipped")
    if not hasattr(trt, "IInt8EntropyCalibrator2"):
        pytest.skip(f"TensorRT {trt.__version__} has no calibrators (removed in 11.0)")
    from calib.export import format_cache

    _, fp32 = _qdq_model(tmp_path)
    cache = format_cache({"x": 4.0, "c": 20.0, "y": 20.0}).encode()
    out = trt_adapter.build_engine_from_cache(fp32, cache, tmp_path / "model.engine", workspace_bytes=1 << 28)
    assert out.stat().st_size > 0
