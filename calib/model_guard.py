"""Model checks of issue 18 kept out of ``calib.model``: refuse an already quantized model; lift IR 3 models.

Only onnx and ``calib.errors`` are imported, so ``calib.model`` can use this module.
"""

from __future__ import annotations

import onnx
from onnx import helper

from calib.errors import ModelError

__all__ = ["QUANTIZED_OPS", "refuse_quantized", "lift_ir3"]


QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
                           "QLinearMatMul", "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearMul"})


def refuse_quantized(model) -> None:
    """Raise ``ModelError`` if ``model`` is already quantized: calibrating INT8 twice is never meant."""
    q = [n for n in model.graph.node if n.op_type in QUANTIZED_OPS]
    if q:
        raise ModelError(f"{model.path or 'model'}: is already quantized ({len(q)} quantization node(s), e.g. "
                         f"'{q[0].name}' {q[0].op_type})", hint="pass the FP32 model it was made from")


def lift_ir3(proto: onnx.ModelProto) -> str:
    """IR 3 (opset 7/8 exports) lists every initializer as a graph input, and onnx.checker then demands that
    of every initializer the Q/DQ export adds: drop initializers from the inputs and move to IR >= 4."""
    init = {t.name for t in proto.graph.initializer}
    keep = [vi for vi in proto.graph.input if vi.name not in init]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
    old, proto.ir_version = proto.ir_version, max(4, helper.find_min_ir_version_for(list(proto.opset_import)))
    return f"IR version {old} -> {proto.ir_version} (initializers are no longer graph inputs)"
