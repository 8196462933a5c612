"""Compare: FP32 vs INT8 layer by layer, task metrics, sensitivity, and automatic mixed precision.

``compare`` (per-layer and output metrics, streamed), ``sensitivity`` (which
quantized node costs what), ``advise`` (fewest float nodes / better ranges that
meet a target), ``write_html`` (self-contained report). Figures live in
``calib.plots``.
"""

from calib.compare.advice import Advice, advise
from calib.compare.html import render_html, write_html
from calib.compare.mapping import QdqInput, TensorMap, TensorPair, map_models
from calib.compare.metrics import TaskAccumulator, TensorAccumulator
from calib.compare.report import CompareReport, compare
from calib.compare.sensitivity import Sensitivity, sensitivity
from calib.compare.targets import TARGET_METRICS, OutputMetrics, Target, UserMetric, load_metric, parse_target

__all__ = [
    "compare", "CompareReport", "map_models", "TensorMap", "TensorPair", "QdqInput",
    "TensorAccumulator", "TaskAccumulator", "OutputMetrics",
    "sensitivity", "Sensitivity", "advise", "Advice", "render_html", "write_html",
    "Target", "parse_target", "TARGET_METRICS", "UserMetric", "load_metric",
]
