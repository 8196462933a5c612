"""NVIDIA ModelOpt ONNX PTQ: ``modelopt.onnx.quantization.quantize`` int8, ``entropy`` or ``max``,
CPU execution provider for calibration, ``high_precision_dtype="fp32"`` so ONNX Runtime CPU runs the result."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Phases, job_args, load_npz, make_reader, versions, write_result  # noqa: E402


def main() -> None:
    args = job_args(["entropy", "max"])
    ph = Phases()
    from modelopt.onnx.quantization import quantize

    arrays, _ = load_npz(args.calib)
    ph.mark("load")
    int8 = Path(args.out) / "model.int8.onnx"
    quantize(
        args.model, quantize_mode="int8", calibration_data_reader=make_reader(arrays), calibration_method=args.method,
        calibration_eps=["cpu"], high_precision_dtype="fp32", output_path=str(int8), log_level="WARNING",
    )
    ph.mark("quantize")
    write_result(args.out, {"int8_model": str(int8), "phases": ph.times,
                            "versions": versions("modelopt", "onnxruntime", "onnx", "torch", "numpy")})


if __name__ == "__main__":
    main()
