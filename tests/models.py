"""Small ONNX graphs built in code (fixed seeds, IR version 10, opset 17) for the core tests.

Each builder returns an ``onnx.ModelProto`` that passes ``onnx.checker`` and runs on ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10
OPSET = 17
F32_MIN = float(np.finfo(np.float32).min)


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def _model(nodes, inputs, outputs, inits, name: str, opset: int = OPSET, ir_version: int = IR_VERSION,
           extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    m = helper.make_model(graph, opset_imports=opsets, producer_name="calib-tests")
    m.ir_version = ir_version
    onnx.checker.check_model(m)
    return m


def cnn_residual(seed: int = 0, channels: int = 8, size: int = 16) -> onnx.ModelProto:
    """x[N,3,S,S] -> Conv -> Relu -> Conv -> Add(residual) -> Relu -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    c = channels
    inits = [
        _init("w1", rng.normal(0, 0.5, (c, 3, 3, 3)).astype(np.float32)),
        _init("b1", rng.normal(0, 0.1, c).astype(np.float32)),
        _init("w2", rng.normal(0, 0.3, (c, c, 3, 3)).astype(np.float32)),
        _init("b2", rng.normal(0, 0.1, c).astype(np.float32)),
        _init("wf", rng.normal(0, 0.5, (4, c)).astype(np.float32)),
        _init("bf", rng.normal(0, 0.1, 4).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["res"], name="residual_add"),
        helper.make_node("Relu", ["res"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], inits, "cnn_residual")


def transformer_block(seed: int = 0, seq: int = 6, dim: int = 8) -> onnx.ModelProto:
    """One encoder block: single-head attention with an additive mask, LayerNorm, feed-forward.

    Inputs x[N,T,D] float and mask[N,T] float (1 = keep, 0 = padding). The mask path computes
    (1 - mask) * float32_min and adds it to the scores, as exported transformers do; a mask value
    of -1 gives 2 * float32_min = -inf, so a whole row of scores is -inf and Softmax yields NaN.
    """
    rng = np.random.default_rng(seed)
    d = dim
    w = {k: rng.normal(0, 1 / np.sqrt(d), (d, d)).astype(np.float32) for k in ("wq", "wk", "wv", "wo")}
    inits = [_init(k, v) for k, v in w.items()] + [
        _init("one", np.array(1.0, np.float32)),
        _init("fmin", np.array(F32_MIN, np.float32)),
        _init("inv_sqrt_d", np.array(1 / np.sqrt(d), np.float32)),
        _init("ax1", np.array([1], np.int64)),
        _init("ln1_g", (1 + rng.normal(0, 0.1, d)).astype(np.float32)),
        _init("ln1_b", rng.normal(0, 0.1, d).astype(np.float32)),
        _init("ff1", rng.normal(0, 0.5, (d, 2 * d)).astype(np.float32)),
        _init("ff2", rng.normal(0, 0.5, (2 * d, d)).astype(np.float32)),
        _init("ln2_g", (1 + rng.normal(0, 0.1, d)).astype(np.float32)),
        _init("ln2_b", rng.normal(0, 0.1, d).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["qk"], name="scores"),
        helper.make_node("Mul", ["qk", "inv_sqrt_d"], ["scaled"], name="scale"),
        helper.make_node("Sub", ["one", "mask"], ["inv_mask"], name="mask_invert"),
        helper.make_node("Mul", ["inv_mask", "fmin"], ["mask_add"], name="mask_fmin"),
        helper.make_node("Unsqueeze", ["mask_add", "ax1"], ["mask_b"], name="mask_unsqueeze"),
        helper.make_node("Add", ["scaled", "mask_b"], ["masked"], name="mask_scores"),
        helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["ctx"], name="context"),
        helper.make_node("MatMul", ["ctx", "wo"], ["attn"], name="o_proj"),
        helper.make_node("Add", ["attn", "x"], ["res1"], name="residual1"),
        helper.make_node("LayerNormalization", ["res1", "ln1_g", "ln1_b"], ["h1"], name="ln1", axis=-1),
        helper.make_node("MatMul", ["h1", "ff1"], ["f1"], name="ff_in"),
        helper.make_node("Relu", ["f1"], ["f1r"], name="ff_relu"),
        helper.make_node("MatMul", ["f1r", "ff2"], ["f2"], name="ff_out"),
        helper.make_node("Add", ["f2", "h1"], ["res2"], name="residual2"),
        helper.make_node("LayerNormalization", ["res2", "ln2_g", "ln2_b"], ["y"], name="ln2", axis=-1),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", seq, d]),
              helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", seq])]
    return _model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", seq, d])], inits,
                  "transformer_block")


def lstm(seed: int = 0, seq: int = 5, features: int = 4, hidden: int = 6) -> onnx.ModelProto:
    """x[N,T,F] -> Transpose -> LSTM -> Squeeze -> Transpose -> MatMul (batch axis first for calib)."""
    rng = np.random.default_rng(seed)
    h = hidden
    inits = [
        _init("W", rng.normal(0, 0.5, (1, 4 * h, features)).astype(np.float32)),
        _init("R", rng.normal(0, 0.5, (1, 4 * h, h)).astype(np.float32)),
        _init("B", rng.normal(0, 0.1, (1, 8 * h)).astype(np.float32)),
        _init("ax1", np.array([1], np.int64)),
        _init("wout", rng.normal(0, 0.5, (h, 3)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], name="to_tnf", perm=[1, 0, 2]),
        helper.make_node("LSTM", ["xt", "W", "R", "B"], ["Y", "Y_h"], name="lstm", hidden_size=h),
        helper.make_node("Squeeze", ["Y", "ax1"], ["ys"], name="squeeze"),
        helper.make_node("Transpose", ["ys"], ["yb"], name="to_nth", perm=[1, 0, 2]),
        helper.make_node("MatMul", ["yb", "wout"], ["out"], name="head"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", seq, features])],
                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", seq, 3])], inits, "lstm")


def gemm_mlp(seed: int = 0, features: int = 10, hidden: int = 16, classes: int = 3) -> onnx.ModelProto:
    """x[N,F] -> Gemm -> Relu -> Gemm -> Tanh -> Gemm."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("w1", rng.normal(0, 0.5, (features, hidden)).astype(np.float32)),
        _init("b1", rng.normal(0, 0.1, hidden).astype(np.float32)),
        _init("w2", rng.normal(0, 0.5, (hidden, hidden)).astype(np.float32)),
        _init("b2", rng.normal(0, 0.1, hidden).astype(np.float32)),
        _init("w3", rng.normal(0, 0.5, (classes, hidden)).astype(np.float32)),
        _init("b3", rng.normal(0, 0.1, classes).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["g1"], name="fc1"),
        helper.make_node("Relu", ["g1"], ["a1"], name="act1"),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["g2"], name="fc2"),
        helper.make_node("Tanh", ["g2"], ["a2"], name="act2"),
        helper.make_node("Gemm", ["a2", "w3", "b3"], ["y"], name="fc3", transB=1),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])], inits, "gemm_mlp")


def token_embedding(seed: int = 0, vocab: int = 50, seq: int = 7, dim: int = 8) -> onnx.ModelProto:
    """ids[N,T] int64 -> Gather(embedding) -> MatMul -> ReduceMean: the integer input is never quantized."""
    rng = np.random.default_rng(seed)
    inits = [_init("emb", rng.normal(0, 1, (vocab, dim)).astype(np.float32)),
             _init("w", rng.normal(0, 0.5, (dim, dim)).astype(np.float32))]
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed", axis=0),
        helper.make_node("MatMul", ["e", "w"], ["m"], name="proj"),
        helper.make_node("ReduceMean", ["m"], ["y"], name="pool", axes=[1], keepdims=0),
    ]
    return _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", seq])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])], inits, "token_embedding")


def opset11_constant_weights(seed: int = 0) -> onnx.ModelProto:
    """A Paddle-style opset 11 graph: weights in Constant nodes, metadata_props set.

    x[N,2,8,8] -> Conv(W from Constant) -> Relu -> Clip (opset 11 min/max inputs) -> GlobalAveragePool.
    """
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.5, (4, 2, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.1, 4).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
        helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(b, "b")),
        helper.make_node("Constant", [], ["lo"], value=numpy_helper.from_array(np.array(0, np.float32), "lo")),
        helper.make_node("Constant", [], ["hi"], value=numpy_helper.from_array(np.array(6, np.float32), "hi")),
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Clip", ["r", "lo", "hi"], ["cl"]),
        helper.make_node("GlobalAveragePool", ["cl"], ["y"]),
    ]
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 8, 8])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 1, 1])], [], "opset11_constants",
               opset=11, ir_version=6)
    helper.set_model_props(m, {"character": "a\nb\nc", "source": "calib-tests"})
    return m


def save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)
