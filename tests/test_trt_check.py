"""calib trt-check (issue 17): kit files read back as trtexec reads them; layer info from documented fixtures.

Layer-info fixtures follow trtexec ``--exportLayerInfo`` with ``--profilingVerbosity=detailed``
(IEngineInspector JSON): {"Layers": [{"Name", "LayerType", "Inputs"/"Outputs": [{"Name",
"Format/Datatype", ...}], "Metadata": "[ONNX Layer: a]\\x1f[ONNX Layer: b]"}], "Bindings": [...]}.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from calib.cli import main
from calib.compare.trt_check import UNVERIFIED_FLAGS, layer_report, parse_layer_info
from calib.errors import CalibError
from calib.export.groups import fusion_groups
from tests import models

INT8 = "Thirty-two wide channel vectorized row major Int8 format"
HALF = "Channel major FP16 format where channel % 8 == 0"
FP32 = "Row major linear FP32"


def _t(name, fmt):
    return {"Name": name, "Location": "Device", "Dimensions": [2, 8, 16, 16], "Format/Datatype": fmt}


def _layer(name, kind, fin, fout, *onnx_nodes):
    return {"Name": name, "LayerType": kind, "Inputs": [_t("in", fin)], "Outputs": [_t("out", fout)],
            "Metadata": "\x1f".join(f"[ONNX Layer: {n}]" for n in onnx_nodes)}


LAYERS = {"Layers": [
    _layer("x_QuantizeLinear", "Scale", FP32, INT8, "x_QuantizeLinear"),
    _layer("conv1 + relu1", "CaskConvolution", INT8, INT8, "x_DequantizeLinear", "w1_DequantizeLinear", "conv1",
           "relu1"),
    _layer("conv2 + residual_add + relu2", "CaskConvolution", INT8, HALF, "r1_DequantizeLinear", "conv2",
           "residual_add", "relu2"),
    _layer("Reformatting CopyNode for Input Tensor 0 to gap", "Reformat", HALF, FP32),
    _layer("gap", "CaskPooling", FP32, FP32, "gap"),
    _layer("flatten", "Shuffle", FP32, FP32, "flatten"),
    _layer("fc", "CaskGemm", HALF, HALF, "flat_DequantizeLinear", "fc"),
], "Bindings": ["x", "logits"]}


def test_layer_report_of_a_fixture():
    layers = parse_layer_info(LAYERS)
    assert [lay.precision for lay in layers] == ["INT8", "INT8", "INT8", "FP32", "FP32", "FP32", "FP16"]
    assert layers[1].onnx_nodes == ["x_DequantizeLinear", "w1_DequantizeLinear", "conv1", "relu1"]
    doc = layer_report(layers, fusion_groups(models.cnn_residual()))
    assert doc["precision_counts"] == {"INT8": 3, "FP32": 2, "FP16": 1}  # the reformat is counted apart
    assert doc["reformat_layers"] == ["Reformatting CopyNode for Input Tensor 0 to gap"]
    assert doc["fp32_islands"] == [["gap", "flatten"]]
    assert doc["groups"]["conv2"]["precisions"] == ["INT8"] and doc["groups"]["gap"]["precisions"] == ["FP32"]
    assert doc["groups_split"] == [] and doc["groups_unseen"] == []


def test_a_group_split_over_layers_is_reported():
    split = json.loads(json.dumps(LAYERS))
    split["Layers"][2] = _layer("conv2", "CaskConvolution", INT8, HALF, "conv2")
    split["Layers"].insert(3, _layer("residual_add + relu2", "PointWiseV2", HALF, HALF, "residual_add", "relu2"))
    doc = layer_report(parse_layer_info(split), fusion_groups(models.cnn_residual()))
    assert doc["groups_split"] == ["conv2"]
    assert doc["groups"]["conv2"]["precisions"] == ["INT8", "FP16"]


def test_names_only_layer_info_is_refused():
    with pytest.raises(CalibError, match="profilingVerbosity=detailed"):
        parse_layer_info({"Layers": ["conv1 + relu1", "fc"]})
    with pytest.raises(CalibError, match="Layers"):
        parse_layer_info([1, 2])


def test_cli_layer_info(tmp_path):
    p, rep, m = tmp_path / "layers.json", tmp_path / "rep.json", tmp_path / "m.onnx"
    p.write_text(json.dumps(LAYERS))
    models.save(models.cnn_residual(), m)
    assert main(["-q", "trt-check", "--layer-info", str(p), "--model", str(m), "--report", str(rep)]) == 0
    assert json.loads(rep.read_text())["fp32_islands"] == [["gap", "flatten"]]


@pytest.mark.parametrize("builder, dtype", [("cnn_residual", "<f4"), ("token_embedding", "<i8")])
def test_kit_files_load_as_raw_little_endian(tmp_path, builder, dtype):
    proto = getattr(models, builder)()
    m = tmp_path / "m.onnx"
    models.save(proto, m)
    sess = ort.InferenceSession(str(m), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    rng = np.random.default_rng(0)
    if builder == "cnn_residual":
        x = rng.standard_normal((5, 3, 16, 16)).astype(np.float32)
    else:
        x = rng.integers(0, 50, (5,) + tuple(d if isinstance(d, int) else 1 for d in inp.shape[1:])).astype(np.int64)
    np.savez(tmp_path / "eval.npz", **{inp.name: x})
    out = tmp_path / "kit"
    assert main(["-q", "trt-check", str(m), "--data", str(tmp_path / "eval.npz"), "-o", str(out), "--limit", "4"]) == 0
    kit = json.loads((out / "kit.json").read_text())
    i = kit["inputs"][0]
    got = np.fromfile(out / i["file"], dtype=dtype).reshape(i["shape"])  # exactly trtexec's raw read
    assert np.array_equal(got, x[:4])
    ref = sess.run(None, {inp.name: x[:4]})
    for o, r in zip(kit["outputs"], ref):
        assert np.array_equal(np.fromfile(out / o["file"], dtype="<" + r.dtype.str[1:]).reshape(o["shape"]), r)
    line = next(ln for ln in kit["trtexec"] if ln.startswith("trtexec"))
    assert f"--loadInputs='{i['name']}':{out / i['file']}" in line and "--profilingVerbosity=detailed" in line
    assert "--exportLayerInfo=" in line and all(f in line for f in UNVERIFIED_FLAGS)
    assert any("unverified" in ln for ln in kit["trtexec"])


def test_engine_layer_info_through_the_python_api(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (needs an NVIDIA GPU); the Python-API "
                        "layer-info path cannot run here")
    from calib import trt as trt_adapter

    m, data, stats, q = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "s.npz", tmp_path / "q.onnx"
    models.save(models.cnn_residual(), m)
    np.savez(data, x=np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32))
    assert main(["-q", "collect", str(m), "--data", str(data), "-o", str(stats)]) == 0
    assert main(["-q", "export", str(m), "--stats", str(stats), "-o", str(q), "--target-runtime", "trt"]) == 0
    engine = trt_adapter.build_engine(q, tmp_path / "m.engine", detailed=True)
    layers = parse_layer_info(json.loads(trt_adapter.engine_layer_info(engine)))
    assert "INT8" in {lay.precision for lay in layers}
