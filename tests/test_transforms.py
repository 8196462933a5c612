"""FP32 transforms (cross-layer equalization, SmoothQuant) as candidates of ``auto``: exact in FP32, kept only
where they help on the selection samples, reported in the scale report's ``transforms`` list."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from calib.data.split import hash_fraction
from calib.export.transforms import apply_sites, find_sites, migration_scales
from calib.pipeline import quantize
from calib.pipeline.inputs import open_run_data
from calib.model import load_model

from models import _init, _model

N = 48  # calibration samples (a quarter of them select)


def conv_pair(scales, seed: int = 0, depthwise: bool = False, act: str = "Relu", c: int = 8) -> onnx.ModelProto:
    """x[N,c,8,8] -> conv1 (1x1, or 3x3 depthwise) with output channel i scaled by scales[i] -> act -> conv2 (1x1,
    c -> 4) with input channel i divided by scales[i]: every channel matters equally to y, but the tensor
    between the convs has wildly different per-channel ranges when ``scales`` do."""
    rng = np.random.default_rng(seed)
    s = np.asarray(scales, np.float32)
    if depthwise:
        w1 = (rng.normal(0, 0.5, (c, 1, 3, 3)) + 0.3).astype(np.float32) * s[:, None, None, None]
        conv1 = helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", group=c, pads=[1, 1, 1, 1])
    else:
        w1 = (np.eye(c) + rng.normal(0, 0.1, (c, c))).astype(np.float32)[:, :, None, None] * s[:, None, None, None]
        conv1 = helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1")
    b1 = (rng.normal(0, 0.1, c) * s).astype(np.float32)
    w2 = (rng.normal(0, 0.5, (4, c)) / s[None, :]).astype(np.float32)[:, :, None, None]
    nodes = [conv1]
    mid = "c1"
    if act == "Relu":
        nodes.append(helper.make_node("Relu", ["c1"], ["r1"], name="relu"))
        mid = "r1"
    elif act == "Relu6":
        nodes.append(helper.make_node("Clip", ["c1", "zero", "six"], ["r1"], name="relu6"))
        mid = "r1"
    nodes.append(helper.make_node("Conv", [mid, "w2", "b2"], ["y"], name="conv2"))
    inits = [_init("w1", w1), _init("b1", b1), _init("w2", w2), _init("b2", np.zeros(4, np.float32)),
             _init("zero", np.array(0, np.float32)), _init("six", np.array(6, np.float32))]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits, "conv_pair")


def ln_matmul(gamma, seed: int = 0, decomposed: bool = False, d: int = 16) -> onnx.ModelProto:
    """x[N,6,d] -> LayerNormalization (or its tail Add(Mul(x, gamma), beta) on x itself) -> MatMul [d, 8] -> y."""
    rng = np.random.default_rng(seed)
    g = np.asarray(gamma, np.float32)
    inits = [_init("gamma", g), _init("beta", rng.normal(0, 0.1, d).astype(np.float32)),
             _init("w", rng.normal(0, 0.5, (d, 8)).astype(np.float32))]
    if decomposed:
        nodes = [helper.make_node("Mul", ["x", "gamma"], ["m"], name="ln_scale"),
                 helper.make_node("Add", ["m", "beta"], ["h"], name="ln_shift")]
    else:
        nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln", axis=-1)]
    nodes.append(helper.make_node("MatMul", ["h", "w"], ["y"], name="proj"))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, d])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 8])], inits, "ln_matmul")


def _run(proto, x):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _absmax(proto, tensor, axis, x):
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    m.graph.output.append(helper.make_empty_tensor_value_info(tensor))
    v = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run([tensor], {"x": x})[0]
    return np.abs(np.moveaxis(v, axis, -1)).reshape(-1, v.shape[axis]).max(axis=0)


SPREAD = [100, 0.01, 1, 10, 0.1, 30, 0.3, 3]


@pytest.mark.parametrize("proto,kind", [
    (conv_pair(SPREAD), "equalize"), (conv_pair(SPREAD, depthwise=True), "equalize"),
    (conv_pair(SPREAD, act="none"), "equalize"),
    (ln_matmul([40, 1, 1, 25] + [1] * 12), "smoothquant"), (ln_matmul([40, 1, 1, 25] + [1] * 12, decomposed=True),
                                                            "smoothquant")])
def test_fp32_outputs_unchanged(proto, kind):
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, [4] + [d.dim_value or 4 for d in proto.graph.input[0].type.tensor_type.shape.dim][1:])
    x = x.astype(np.float32)
    sites = find_sites(proto, kind)
    assert len(sites) == 1
    absmax = {s.tensor: _absmax(proto, s.tensor, s.axis, x) for s in sites}
    new, scales = apply_sites(proto, sites, absmax)
    s = scales[sites[0].tensor]
    assert s.std() > 0.1  # really moved something
    want = _run(proto, x)
    np.testing.assert_allclose(_run(new, x), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # the tensor the consumers read now has max|x_j| = sqrt(max|x_j| * max|W_j|) per channel
    after = _absmax(new, sites[0].tensor, sites[0].axis, x)
    np.testing.assert_allclose(after, absmax[sites[0].tensor] / s, rtol=1e-4)
    assert len(new.graph.node) == len(proto.graph.node)  # no node added


def test_scales_formula():
    s = migration_scales(np.array([16.0, 0.0, 4.0]), np.array([1.0, 2.0, 0.0]), alpha=0.5)
    np.testing.assert_allclose(s, [4.0, 1.0, 1.0])
    np.testing.assert_allclose(migration_scales(np.array([8.0]), np.array([2.0]), alpha=0.75),
                               [8 ** 0.75 / 2 ** 0.25])


def test_relu6_and_other_readers_are_never_crossed():
    assert find_sites(conv_pair(SPREAD, act="Relu6"), "equalize") == []
    # conv1's output also read by the residual-style graph output: not divisible
    p = conv_pair(SPREAD, act="none")
    p.graph.output.append(helper.make_tensor_value_info("c1", TensorProto.FLOAT, None))
    assert find_sites(p, "equalize") == []


def _data(tmp_path, proto, x):
    onnx.save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=x.astype(np.float32))
    return tmp_path / "m.onnx", tmp_path / "d.npz"


def _report_ids(model_path, data_path) -> np.ndarray:
    """Which samples are in the report part (not selection) of the default split."""
    src = open_run_data(data_path, load_model(model_path))
    return np.array([hash_fraction(s.id) >= 0.25 for s in src])


def _quantize(tmp_path, proto, x, kind):
    m, d = _data(tmp_path, proto, x)
    out, rep = tmp_path / "q.onnx", tmp_path / "scales.json"
    res = quantize(m, d, out, report=rep, auto_transforms=[kind], batch_size=16)
    entry = next(t for t in json.loads(rep.read_text())["transforms"] if t["name"] == kind)
    names = {i.name for i in onnx.load(out).graph.initializer}
    return res, entry, any(n.endswith("_" + kind) for n in names)


@pytest.mark.parametrize("proto,shape,kind", [(conv_pair(SPREAD), (N, 8, 8, 8), "equalize"),
                                              (ln_matmul([60, 1, 1, 30] + [1] * 12), (N, 6, 16), "smoothquant")])
def test_kept_where_it_helps(tmp_path, proto, shape, kind):
    x = np.random.default_rng(2).normal(0, 1, shape)
    res, entry, edited = _quantize(tmp_path, proto, x, kind)
    assert entry["kept"] and entry["selection_delta"] > 1.0 and entry["held_out_delta"] > 0, entry
    assert entry["held_out_in_sample"] and entry["metric"] == "sqnr_db" and entry["nodes"]
    assert edited and kind in res.path


@pytest.mark.parametrize("proto,shape,kind", [(conv_pair([1] * 8), (N, 8, 8, 8), "equalize"),
                                              (ln_matmul([1] * 16, decomposed=True), (N, 6, 16), "smoothquant")])
def test_undone_where_it_does_not_help(tmp_path, proto, shape, kind):
    # balanced channels; channel 0 has rare huge spikes, only in samples the selection never sees: the
    # per-channel max (measured on all calibration samples) makes s_0 large, which shrinks channel 0's
    # typical values to a few int8 levels and blows up its weights on the selection samples
    x = np.abs(np.random.default_rng(3).normal(0, 1, shape))
    m, d = _data(tmp_path, proto, x)
    spiky = _report_ids(m, d)
    ch = np.moveaxis(x, 1 if kind == "equalize" else -1, 1)[:, 0]  # channel 0 of every sample (a view)
    spikes = 1 + 300 * (np.random.default_rng(4).random(ch.shape[1:]) > 0.98)
    ch[np.flatnonzero(spiky)[:4]] *= spikes
    np.savez(d, x=x.astype(np.float32))
    res, entry, edited = _quantize(tmp_path, proto, x, kind)
    assert entry["nodes"] and not entry["kept"] and entry["selection_delta"] < 0, entry
    assert not edited and kind not in res.path
