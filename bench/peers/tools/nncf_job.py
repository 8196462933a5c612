"""NNCF post-training quantization of the ONNX model: ``nncf.quantize`` with its defaults (preset
PERFORMANCE: symmetric int8, per-channel weights, fast bias correction), or with the HISTOGRAM range
estimator for activations. ``subset_size`` is set to the number of calibration batches so every sample is used."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Phases, batches, job_args, load_npz, versions, write_result  # noqa: E402


def main() -> None:
    args = job_args(["default", "histogram"])
    ph = Phases()
    import nncf
    import onnx
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    arrays, _ = load_npz(args.calib)
    model = onnx.load(args.model)
    items = batches(arrays)
    ph.mark("load")
    kwargs = {}
    if args.method == "histogram":
        kwargs["advanced_parameters"] = AdvancedQuantizationParameters(
            activations_range_estimator_params=RangeEstimatorParametersSet.HISTOGRAM
        )
    q = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items), **kwargs)
    ph.mark("quantize")
    int8 = Path(args.out) / "model.int8.onnx"
    onnx.save(q, str(int8))
    ph.mark("save")
    write_result(args.out, {"int8_model": str(int8), "phases": ph.times,
                            "versions": versions("nncf", "onnxruntime", "onnx", "numpy")})


if __name__ == "__main__":
    main()
