"""Stage 3: turn ranges into deployable artifacts.

``export_qdq`` (Q/DQ ONNX for TensorRT and ONNX Runtime), ``write_cache`` /
``read_cache`` (TensorRT calibration cache), ``scale_report`` (JSON of every
scale), ``flagged_tensors`` (the NaN/inf policy: which tensors stay float, from the
statistics), ``correct_bias`` (bias correction of an exported model on real data). The TensorRT engine build lives in ``calib.trt``.
"""

from calib.export.bias import BiasCorrection, correct_bias
from calib.export.placement import HUGE_AMAX, PLACEMENTS, Plan, flagged_tensors, resolve_exclude
from calib.export.qdq import QdqModel, WeightQuant, export_qdq, weight_scales
from calib.export.scales import scale_report, write_scale_report
from calib.export.trt_cache import (
    DEFAULT_TRT_VERSION,
    format_cache,
    parse_cache,
    read_cache,
    scale_to_hex,
    hex_to_scale,
    write_cache,
)

__all__ = [
    "BiasCorrection",
    "correct_bias",
    "HUGE_AMAX",
    "PLACEMENTS",
    "Plan",
    "resolve_exclude",
    "flagged_tensors",
    "QdqModel",
    "WeightQuant",
    "export_qdq",
    "weight_scales",
    "scale_report",
    "write_scale_report",
    "DEFAULT_TRT_VERSION",
    "format_cache",
    "parse_cache",
    "read_cache",
    "write_cache",
    "scale_to_hex",
    "hex_to_scale",
]
