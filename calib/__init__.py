"""calib: an INT8 calibration workbench for ONNX models.

Pipeline: ``collect`` (statistics) -> ``calibrate`` (ranges) -> ``export_qdq`` /
TensorRT cache -> ``calib.compare.compare`` / ``advise``. Every stage is a function from plain
data to plain data; the CLI and the dashboard only parse, call these, and show.
"""

from calib.calibrate import (
    METHODS,
    Entropy,
    MinMax,
    Mse,
    Percentile,
    Ranges,
    TensorRange,
    calibrate,
    calibrate_all,
    load_ranges,
    parse_method,
    save_ranges,
    weight_ranges,
)
from calib.collect import collect
from calib.data import ListSource, NpzSource, Sample
from calib.errors import (
    CacheFormatError,
    CalibError,
    ConfigError,
    InputDataError,
    ModelError,
    RangesError,
    RunStoreError,
    TargetNotMet,
    TensorRTUnavailable,
)
from calib.model import Model, load_model
from calib.stats import ActivationStats, TensorHistogram

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "load_model", "Model",
    "collect", "ActivationStats", "TensorHistogram",
    "calibrate", "calibrate_all", "parse_method", "METHODS", "MinMax", "Percentile", "Entropy", "Mse",
    "Ranges", "TensorRange", "weight_ranges", "save_ranges", "load_ranges",
    "Sample", "NpzSource", "ListSource",
    "CalibError", "InputDataError", "ModelError", "CacheFormatError", "RangesError", "ConfigError",
    "RunStoreError", "TensorRTUnavailable", "TargetNotMet",
]


def __getattr__(name: str):
    # Later stages are imported lazily so `import calib` stays light.
    lazy = {
        "export_qdq": ("calib.export", "export_qdq"),
        "advise": ("calib.compare", "advise"),
    }
    if name in lazy:
        import importlib

        mod, attr = lazy[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'calib' has no attribute {name!r}")
