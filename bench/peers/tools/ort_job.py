"""ONNX Runtime ``quantize_static`` (QDQ, per-channel int8 weights, symmetric int8 activations).

Methods: minmax, entropy (ORT's default: 128 histogram bins, which gives the MinMax ranges),
entropy2048 (2048 bins), percentile (ORT's default 99.999, 2048 bins).

Why ``entropy2048`` is not a plain ``quantize_static`` call: ``quantize_static`` forwards to its calibrator
only the ``extra_options`` keys CalibTensorRangeSymmetric, CalibMovingAverage, CalibMovingAverageConstant,
CalibMaxIntermediateOutputs and CalibPercentile (onnxruntime/quantization/quantize.py,
``calib_extra_options_keys``); ``num_bins`` is read by ``create_calibrator`` (calibrate.py) from its own
``extra_options`` but never reaches it from ``quantize_static``. So this job builds the calibrator itself with
``create_calibrator(..., CalibrationMethod.Entropy, extra_options={"num_bins": 2048, "symmetric": True})``
over the same op types ``quantize_static`` would calibrate, runs ``collect_data``/``compute_data``, writes
the ranges with ``save_tensors_data`` and hands them to ``quantize_static(..., calibration_cache_path=...)``,
which then quantizes from those ranges without a second calibration pass.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Phases, job_args, load_npz, make_reader, versions, write_result  # noqa: E402


def main() -> None:
    args = job_args(["minmax", "entropy", "entropy2048", "percentile"])
    ph = Phases()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    arrays, _ = load_npz(args.calib)
    ph.mark("load")
    out_dir = Path(args.out)
    int8 = out_dir / "model.int8.onnx"
    common = dict(
        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        calibration_providers=["CPUExecutionProvider"],
    )
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "CalibTensorRangeSymmetric": True}
    if args.method == "entropy2048":
        op_types = list(set(QLinearOpsRegistry) | set(QDQRegistry))
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            calibrator = create_calibrator(
                Path(args.model), op_types, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                calibrate_method=CalibrationMethod.Entropy, providers=["CPUExecutionProvider"],
                extra_options={"num_bins": 2048, "symmetric": True},
            )
            calibrator.collect_data(make_reader(arrays))
            ph.mark("collect")
            ranges = calibrator.compute_data()
            del calibrator
            ph.mark("calibrate")
        cache = out_dir / "ranges.json"
        save_tensors_data(ranges, cache)
        quantize_static(args.model, int8, None, calibrate_method=CalibrationMethod.Entropy, extra_options=extra,
                        calibration_cache_path=cache, **common)
        ph.mark("export")
    else:
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[args.method]
        quantize_static(args.model, int8, make_reader(arrays), calibrate_method=method, extra_options=extra, **common)
        ph.mark("quantize")
    write_result(out_dir, {"int8_model": str(int8), "phases": ph.times, "versions": versions("onnxruntime", "onnx", "numpy")})


if __name__ == "__main__":
    main()
