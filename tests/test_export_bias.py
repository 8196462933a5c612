"""Bias correction: measured shifts against a numpy reference, the correction itself, safety."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from reference.fakequant import fake_quant, fake_quant_per_channel

from calib.calibrate import calibrate
from calib.collect import collect
from calib.data import ListSource, Sample
from calib.export import export_qdq
from calib.export.bias import correct_bias, measure_bias_shifts
from calib.model import model_from_proto

F = TensorProto.FLOAT
RNG = np.random.default_rng(7)


def _model(nodes, inputs, outputs, inits, opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    return model_from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=9))


def conv_model(opset=17, seed=0):
    """x[N,3,6,6] -> Conv(W1, b1, pad 1) -> Relu -> Conv(W2, no bias, pad 1) -> y."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 4).astype(np.float32)
    w2 = rng.normal(0, 0.5, (5, 4, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2")]
    return _model(nodes, [helper.make_tensor_value_info("x", F, [None, 3, 6, 6])],
                  [helper.make_tensor_value_info("y", F, [None, 5, 6, 6])], inits, opset)


def source(shape, n=24, seed=3):
    rng = np.random.default_rng(seed)
    # a skewed input (mean far from zero, a few large values): quantization shifts the mean visibly
    return ListSource([Sample(f"s{i}", {"x": (rng.gamma(2.0, 0.6, shape) - 0.3).astype(np.float32)})
                       for i in range(n)])


def conv2d_ref(x: np.ndarray, w: np.ndarray, pad: int) -> np.ndarray:
    """Plain NCHW convolution, stride 1, loops over kernel offsets (the slow, obvious one)."""
    n, c, h, wd = x.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    oh, ow = h + 2 * pad - kh + 1, wd + 2 * pad - kw + 1
    out = np.zeros((n, w.shape[0], oh, ow))
    for o in range(w.shape[0]):
        for ci in range(c):
            for i in range(kh):
                for j in range(kw):
                    out[:, o] += w[o, ci, i, j] * xp[:, ci, i:i + oh, j:j + ow]
    return out


def fp32_tensors(model, src, names):
    p = onnx.ModelProto()
    p.CopyFrom(model.proto)
    del p.graph.output[:]
    p.graph.output.extend(onnx.ValueInfoProto(name=t) for t in names)
    s = ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"])
    xs = np.stack([smp.feeds["x"] for smp in src])
    return dict(zip(names, s.run(None, {"x": xs}))), xs


def quantized(model, src, method="minmax"):
    stats = collect(model, src, batch_size=8)
    return export_qdq(model, calibrate(stats, method))


def test_conv_shift_matches_a_numpy_reference():
    m = conv_model()
    src = source((3, 6, 6))
    q = quantized(m, src)
    shifts, skipped, n = measure_bias_shifts(m, {"m": q}, src, batch_size=5, limit=None, robust=False)
    robust, _, _ = measure_bias_shifts(m, {"m": q}, src, batch_size=5, limit=None)
    assert n == len(src) and not skipped["m"]
    assert set(shifts["m"]) == {"conv1", "conv2"}
    vals, xs = fp32_tensors(m, src, ["r1"])
    kept = 0
    for node, x, w_name, t in (("conv1", xs, "w1", "x"), ("conv2", vals["r1"], "w2", "r1")):
        w = m.weight(w_name)
        xq = fake_quant(x, q.amax[t] / 127.0)
        wq = fake_quant_per_channel(w, 0)
        err = conv2d_ref(xq, wq, 1) - conv2d_ref(x, w, 1)
        ref = err.mean(axis=(0, 2, 3))
        assert np.abs(ref).max() > 1e-4, "the test needs a visible shift"
        np.testing.assert_allclose(shifts["m"][node], ref, rtol=2e-3, atol=2e-6)
        # robust: a channel keeps its shift only where that lowers its mean absolute error
        better = np.abs(err - ref[None, :, None, None]).mean(axis=(0, 2, 3)) < np.abs(err).mean(axis=(0, 2, 3))
        np.testing.assert_allclose(robust["m"][node], np.where(better, ref, 0), rtol=2e-3, atol=2e-6)
        kept += int(better.sum())
    assert 0 < kept


def test_corrected_single_layer_has_no_mean_error_and_inputs_are_untouched():
    m = conv_model()
    src = source((3, 6, 6))
    q = quantized(m, src, "percentile")
    before_model, before_qdq = m.proto.SerializeToString(), q.model.SerializeToString()
    bc = correct_bias(m, q, src, batch_size=7, limit=None, robust=False)
    assert m.proto.SerializeToString() == before_model and q.model.SerializeToString() == before_qdq
    # end to end on the whole two-layer models: the first layer's output error has zero mean per channel
    def run(proto):
        p = onnx.ModelProto()
        p.CopyFrom(proto)
        p.graph.output.append(onnx.ValueInfoProto(name="c1"))
        so = ort.SessionOptions()  # Q/DQ exactly as the spec defines it (no fused int8 kernels)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        s = ort.InferenceSession(p.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return s.run(["c1"], {"x": np.stack([smp.feeds["x"] for smp in src])})[0]
    fp, q0, q1 = run(m.proto), run(q.model), run(bc.qdq.model)
    err0, err1 = (q0 - fp).mean(axis=(0, 2, 3)), (q1 - fp).mean(axis=(0, 2, 3))
    assert np.abs(err0).max() > 1e-4
    np.testing.assert_allclose(err1, 0, atol=1e-5)
    # conv2 had no bias: it gets one; measuring again finds nothing left to correct
    conv2 = next(n for n in bc.qdq.model.graph.node if n.name == "conv2")
    assert len(conv2.input) == 3 and conv2.input[2]
    again, _, _ = measure_bias_shifts(m, {"m": bc.qdq}, src, batch_size=7, limit=None, robust=False)
    for node, s in again["m"].items():
        np.testing.assert_allclose(s, 0, atol=2e-6, err_msg=node)
    assert bc.to_json()["nodes"] == 2


def test_several_models_in_one_pass_equal_one_at_a_time():
    m = conv_model()
    src = source((3, 6, 6))
    stats = collect(m, src, batch_size=8)
    qs = {k: export_qdq(m, calibrate(stats, k)) for k in ("minmax", "entropy")}
    both = correct_bias(m, qs, src, batch_size=8, limit=10)
    for k, q in qs.items():
        one = correct_bias(m, q, src, batch_size=8, limit=10)
        assert one.n_samples == 10
        for node in one.shifts:
            np.testing.assert_allclose(both[k].shifts[node], one.shifts[node], rtol=1e-6, atol=1e-8)


def test_an_opset_12_model_is_measured_after_its_upgrade():
    src = source((3, 6, 6), n=6)
    got = {}
    for opset in (12, 17):
        m = conv_model(opset=opset)  # model_from_proto upgrades opset 12 (Q/DQ per channel needs 13)
        q = export_qdq(m, calibrate(collect(m, src, batch_size=6), "minmax"))
        got[opset], _, _ = measure_bias_shifts(m, {"m": q}, src, batch_size=6, limit=None, robust=False)
    for node in ("conv1", "conv2"):
        np.testing.assert_allclose(got[12]["m"][node], got[17]["m"][node], rtol=1e-5, atol=1e-8)


def test_matmul_add_is_corrected_and_a_bare_matmul_is_skipped():
    w = RNG.normal(0, 0.4, (8, 6)).astype(np.float32)
    b = RNG.normal(0, 0.1, 6).astype(np.float32)
    w2 = RNG.normal(0, 0.4, (6, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
             helper.make_node("Add", ["mm", "b"], ["h"], name="add"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    m = _model(nodes, [helper.make_tensor_value_info("x", F, [None, 4, 8])],
               [helper.make_tensor_value_info("y", F, [None, 4, 3])],
               [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(w2, "w2")])
    src = source((4, 8), n=16)
    q = quantized(m, src)
    bc = correct_bias(m, q, src, batch_size=4, limit=None, robust=False)
    assert "mm2" in bc.skipped and "Add" in bc.skipped["mm2"]
    xs = np.stack([smp.feeds["x"] for smp in src]).astype(np.float64)
    xq = fake_quant(xs, q.amax["x"] / 127.0)
    wq = fake_quant_per_channel(w, 1)
    ref = (xq @ wq - xs @ w).reshape(-1, 6).mean(axis=0)
    np.testing.assert_allclose(bc.shifts["mm"], ref, rtol=2e-3, atol=2e-6)
    add = next(n for n in bc.qdq.model.graph.node if n.name == "add")
    inits = {t.name: numpy_helper.to_array(t) for t in bc.qdq.model.graph.initializer}
    np.testing.assert_allclose(inits[add.input[1]], b - bc.shifts["mm"], rtol=1e-6)
    assert "b" not in inits  # the old bias, read by nobody now, is dropped


def test_excluded_nodes_are_not_touched():
    m = conv_model()
    src = source((3, 6, 6), n=8)
    stats = collect(m, src, batch_size=8)
    q = export_qdq(m, calibrate(stats, "minmax"), exclude=["conv2"])
    bc = correct_bias(m, q, src, batch_size=8, limit=None)
    assert set(bc.shifts) == {"conv1"}
    conv2 = next(n for n in bc.qdq.model.graph.node if n.name == "conv2")
    assert list(conv2.input) == ["r1", "w2"]


@pytest.mark.parametrize("placement", ["trt", "ort"])
def test_corrected_model_runs_in_onnx_runtime(placement):
    m = conv_model()
    src = source((3, 6, 6), n=8)
    stats = collect(m, src, batch_size=8)
    q = export_qdq(m, calibrate(stats, "mse"), placement=placement)
    bc = correct_bias(m, q, src, batch_size=8, limit=None)
    s = ort.InferenceSession(bc.qdq.model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = s.run(None, {"x": np.stack([smp.feeds["x"] for smp in src])})[0]
    assert y.shape == (8, 5, 6, 6) and np.isfinite(y).all()


def test_robust_correction_leaves_alone_an_error_concentrated_on_a_few_positions():
    """A clipped outlier that appears at one position in a hundred: the mean shift would move every
    position to fix one; the robust rule keeps that channel's bias, the plain mean changes it."""
    w = np.eye(4, dtype=np.float32)
    b = np.zeros(4, np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
             helper.make_node("Add", ["mm", "b"], ["y"], name="add")]
    m = _model(nodes, [helper.make_tensor_value_info("x", F, [None, 100, 4])],
               [helper.make_tensor_value_info("y", F, [None, 100, 4])],
               [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    rng = np.random.default_rng(0)
    samples = []
    for i in range(8):
        x = rng.uniform(-1, 1, (100, 4)).astype(np.float32)
        x[rng.integers(100), 0] = 50.0  # channel 0: one outlier per sample, clipped at amax 1
        samples.append(Sample(f"s{i}", {"x": x}))
    src = ListSource(samples)
    from calib.calibrate.base import Ranges, TensorRange

    q = export_qdq(m, Ranges("manual", {"x": TensorRange(1.0, "manual")}, m.sha256))
    plain, _, _ = measure_bias_shifts(m, {"m": q}, src, batch_size=4, limit=None, robust=False)
    robust, _, _ = measure_bias_shifts(m, {"m": q}, src, batch_size=4, limit=None)
    assert plain["m"]["mm"][0] == pytest.approx(-49 / 100, rel=0.02)  # the clipped 50 -> 1, over 100 positions
    assert robust["m"]["mm"][0] == 0.0
