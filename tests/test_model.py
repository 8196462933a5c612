"""load_model: read-only, opset upgrade with equal outputs, Constant folding, metadata, external data."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from calib.errors import ModelError
from calib.model import MIN_OPSET, load_model, model_from_proto


def run_ort(model_or_path, feeds):
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def file_state(path: Path):
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_size


def opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def test_opset11_constant_weights_upgraded_folded_and_metadata_kept(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(models.opset11_constant_weights(), str(path))
    before = file_state(path)
    m = load_model(path)
    assert file_state(path) == before
    assert opset(m.proto) >= MIN_OPSET
    assert not [n for n in m.proto.graph.node if n.op_type == "Constant"]
    assert {"w", "b"} <= set(m.initializers)
    assert {p.key: p.value for p in m.proto.metadata_props} == {"character": "a\nb\nc", "source": "calib-tests"}
    assert len(set(m.nodes)) == len(m.proto.graph.node) and all(m.nodes)  # unique names for unnamed nodes
    assert any("upgraded opset 11" in n for n in m.notes) and any("folded 4 Constant" in n for n in m.notes)
    x = np.random.default_rng(0).normal(0, 2, (3, 2, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run_ort(m.proto, {"x": x})[0], run_ort(path, {"x": x})[0])
    assert {"x", "c", "r"} <= set(m.activation_tensors())
    assert not {"lo", "hi", "w", "b"} & set(m.activation_tensors())  # Constants are not activations


def test_real_opset11_paddle_model_upgrade_keeps_outputs():
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None:
        pytest.skip("rapidocr_onnxruntime is not installed (pip install -e .[dev])")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    original = onnx.load(str(path))
    assert opset(original) == 11 and sum(n.op_type == "Constant" for n in original.graph.node) > 100
    before = file_state(path)
    m = load_model(path)
    assert file_state(path) == before
    assert opset(m.proto) >= MIN_OPSET and not [n for n in m.proto.graph.node if n.op_type == "Constant"]
    assert list(m.proto.metadata_props) == list(original.metadata_props)
    x = np.random.default_rng(1).normal(0, 1, (2, 3, 48, 192)).astype(np.float32)
    ours, theirs = run_ort(m.proto, {"x": x}), run_ort(path, {"x": x})
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert m.weighted_nodes() and all(m.weight(n.input[1]) is not None for n in m.weighted_nodes())


def test_ir_version_above_what_ort_reads_is_lowered():
    proto = models.gemm_mlp()
    proto.ir_version = 14  # onnx 1.23's default, which ONNX Runtime rejects
    m = model_from_proto(proto)
    assert m.proto.ir_version <= 10 and proto.ir_version == 14  # the proto passed in is not changed
    x = np.ones((2, 10), np.float32)
    np.testing.assert_array_equal(run_ort(m.proto, {"x": x})[0], run_ort(models.gemm_mlp(), {"x": x})[0])


def test_integer_inputs_are_not_activations():
    m = model_from_proto(models.token_embedding())
    assert m.inputs[0].dtype == np.int64 and not m.inputs[0].is_float
    assert "ids" not in m.activation_tensors()


# ---- external data -------------------------------------------------------------------------------
def save_external(proto: onnx.ModelProto, folder: Path, location: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=0)
    return path


@pytest.mark.parametrize("location", ["weights.bin", "data/weights.bin"])
def test_external_data_inside_the_folder_is_read(tmp_path, location):
    (tmp_path / "m" / "data").mkdir(parents=True)
    path = save_external(models.cnn_residual(), tmp_path / "m", location)
    files = {p: file_state(p) for p in (tmp_path / "m").rglob("*") if p.is_file()}
    m = load_model(path)
    assert {p: file_state(p) for p in files} == files
    w1 = numpy_helper.to_array(next(t for t in models.cnn_residual().graph.initializer if t.name == "w1"))
    np.testing.assert_array_equal(m.weight("w1"), w1)
    x = np.random.default_rng(0).normal(0, 1, (1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(run_ort(m.proto, {"x": x})[0], run_ort(models.cnn_residual(), {"x": x})[0])


def _point_at(path: Path, location: str) -> None:
    proto = onnx.load(str(path), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    path.write_bytes(proto.SerializeToString())


def test_external_data_outside_the_folder_is_refused(tmp_path):
    path = save_external(models.cnn_residual(), tmp_path / "m", "weights.bin")
    (tmp_path / "m" / "weights.bin").rename(tmp_path / "weights.bin")  # the data now sits one level up
    _point_at(path, "../weights.bin")
    with pytest.raises(ModelError, match=r"tensor '\w+' keeps its data at '../weights.bin', outside the model's"):
        load_model(path)
    _point_at(path, str(tmp_path / "weights.bin"))
    with pytest.raises(ModelError, match="outside the model's folder"):
        load_model(path)
    os.symlink(tmp_path / "weights.bin", tmp_path / "m" / "link.bin")  # a link that leaves the folder
    _point_at(path, "link.bin")
    with pytest.raises(ModelError, match="outside the model's folder"):
        load_model(path)


# ---- unreadable or unsupported models ------------------------------------------------------------
def test_unreadable_models(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        load_model(tmp_path / "nope.onnx")
    with pytest.raises(ModelError, match="is a folder"):
        load_model(tmp_path)
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        load_model(tmp_path / "empty.onnx")


def test_subgraph_with_weights_is_refused_by_name():
    then = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y1"])], "then", [],
                             [helper.make_tensor_value_info("y1", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["y2"])], "else", [],
                              [helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)])
    g = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other)], "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    with pytest.raises(ModelError, match="node 'branch' \\(If\\) holds a subgraph"):
        model_from_proto(proto)
