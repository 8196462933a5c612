"""Small graphs and data for the compare tests (fixed seeds, IR version 10)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calib.data import ListSource, Sample


def small_cnn(seed: int = 0, classes: int = 6) -> onnx.ModelProto:
    """x[N,3,12,12] -> conv1 -> relu -> conv2 -> relu -> conv3 (+ residual add) -> GAP -> flatten -> gemm."""
    rng = np.random.default_rng(seed)

    def w(name, *shape, scale=0.3):
        return numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name)

    inits = [w("W1", 8, 3, 3, 3), w("B1", 8, scale=0.1), w("W2", 8, 8, 3, 3, scale=0.2), w("B2", 8, scale=0.1),
             w("W3", 8, 8, 3, 3, scale=0.2), w("B3", 8, scale=0.1), w("Wf", classes, 8, scale=0.5),
             w("Bf", classes, scale=0.1)]
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "W3", "B3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c3", "r1"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "Wf", "Bf"], ["logits"], name="fc", transB=1),
    ]
    g = helper.make_graph(nodes, "small_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="calib-tests")
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m


def cnn_data(n: int, seed: int = 1, labels: bool = False) -> ListSource:
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(n, 3, 12, 12)).astype(np.float32)
    return ListSource([Sample(f"s{i}", {"x": xs[i]}, int(i % 6) if labels else None) for i in range(n)])


def save_npz(path: Path, source: ListSource, labels: bool = False) -> Path:
    arrays = {"x": np.stack([s.feeds["x"] for s in source])}
    if labels:
        arrays["labels"] = np.array([s.label for s in source], dtype=np.int64)
    np.savez(path, **arrays)
    return path


def ort_qdq(fp32_path: Path, out_path: Path, source: ListSource) -> Path:
    """Quantize with ONNX Runtime's quantize_static (QDQ format, int8), an independent Q/DQ producer."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"x": s.feeds["x"][None]} for s in source])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp32_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return out_path


def calib_qdq(model, source: ListSource, method: str = "minmax", placement: str = "trt"):
    """The calib pipeline: collect -> calibrate -> export_qdq. Returns (stats, ranges, QdqModel)."""
    from calib import calibrate, collect
    from calib.export import export_qdq

    stats = collect(model, source)
    ranges = calibrate(stats, method)
    return stats, ranges, export_qdq(model, ranges, placement=placement)


def cnn_setup(n: int = 48):
    """(model, labelled source of ``n`` samples, stats, ranges, minmax Q/DQ) for the small CNN."""
    from calib.model import model_from_proto

    m = model_from_proto(small_cnn())
    src = cnn_data(n, labels=True)
    stats, ranges, q = calib_qdq(m, src)
    return m, src, stats, ranges, q


def plant_bad_scale(proto: onnx.ModelProto, consumer: str, factor: float = 40.0) -> str:
    """Multiply the activation scale of the Q/DQ chain feeding ``consumer``'s input 0; return the scale name."""
    g = proto.graph
    prod = {o: n for n in g.node for o in n.output}
    node = next(n for n in g.node if n.name == consumer)
    dq = prod[node.input[0]]
    assert dq.op_type == "DequantizeLinear", dq.op_type
    q = prod[dq.input[0]]
    assert q.op_type == "QuantizeLinear"
    name = f"{q.input[1]}_bad"
    old = next(t for t in g.initializer if t.name == q.input[1])
    g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(old) * np.float32(factor), name))
    # a private Q/DQ pair so only this consumer sees the bad scale
    q2 = helper.make_node("QuantizeLinear", [q.input[0], name, q.input[2]], [f"{q.output[0]}_bad"],
                          name=f"{q.name}_bad")
    dq2 = helper.make_node("DequantizeLinear", [q2.output[0], name, dq.input[2]], [f"{dq.output[0]}_bad"],
                           name=f"{dq.name}_bad")
    for a in dq.attribute:
        dq2.attribute.append(a)
    idx = list(g.node).index(node)
    g.node.insert(idx, dq2)
    g.node.insert(idx, q2)
    node.input[0] = dq2.output[0]
    return name
