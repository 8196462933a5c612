"""Compare: FP32 vs INT8 layer by layer, task metrics, sensitivity, and automatic mixed precision."""

from calib.compare.mapping import QdqInput, TensorMap, TensorPair, map_models
from calib.compare.metrics import TaskAccumulator, TensorAccumulator
from calib.compare.report import CompareReport, compare
from calib.compare.targets import TARGET_METRICS, OutputMetrics, Target, UserMetric, load_metric, parse_target

__all__ = [
    "compare", "CompareReport", "map_models", "TensorMap", "TensorPair", "QdqInput",
    "TensorAccumulator", "TaskAccumulator", "OutputMetrics",
    "Target", "parse_target", "TARGET_METRICS", "UserMetric", "load_metric",
]
