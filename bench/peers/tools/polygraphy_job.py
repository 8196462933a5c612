"""Polygraphy per-layer FP32-vs-INT8 comparison, the documented two-step way (runs in the ``polygraphy`` venv):

    polygraphy run fp32.onnx --onnxrt --onnx-outputs mark all --data-loader-script loader.py:load_data \
        --save-outputs fp32_outputs.json
    polygraphy run int8.onnx --onnxrt --onnx-outputs mark all --data-loader-script loader.py:load_data \
        --load-outputs fp32_outputs.json --atol 1e9 --rtol 1e9 --check-error-stat mean

The second command compares every tensor present in both runs (all layers), iteration by iteration, and
prints per-tensor error statistics; the huge tolerances keep it from stopping at the first mismatch, since
the point is the comparison, not a pass/fail. Both steps are timed as one job (the driver measures the tree).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Phases, versions, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp32", required=True)
    ap.add_argument("--int8", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=20)
    args = ap.parse_args()
    out = Path(args.out)
    poly = str(Path(sys.executable).parent / "polygraphy")
    loader = str(Path(__file__).resolve().parent / "polygraphy_loader.py") + ":load_data"
    env = dict(os.environ, BENCH_EVAL_NPZ=str(Path(args.eval).resolve()), BENCH_BATCH=str(args.batch))
    ph = Phases()
    saved = out / "fp32_outputs.json"
    common = ["--onnxrt", "--onnx-outputs", "mark", "all", "--data-loader-script", loader]
    r1 = subprocess.run([poly, "run", args.fp32, *common, "--save-outputs", str(saved)], env=env,
                        capture_output=True, text=True)
    ph.mark("run_fp32_save")
    if r1.returncode != 0:
        raise SystemExit(f"polygraphy FP32 run failed ({r1.returncode}): {r1.stderr[-1500:]}{r1.stdout[-1500:]}")
    r2 = subprocess.run([poly, "run", args.int8, *common, "--load-outputs", str(saved), "--atol", "1e9", "--rtol", "1e9",
                         "--check-error-stat", "mean"], env=env, capture_output=True, text=True)
    ph.mark("run_int8_compare")
    (out / "compare_log.txt").write_text(r2.stdout + r2.stderr)
    if r2.returncode != 0:
        raise SystemExit(f"polygraphy INT8 run/compare failed ({r2.returncode}): {r2.stderr[-1500:]}{r2.stdout[-1500:]}")
    text = r2.stdout + r2.stderr
    compared = len(set(re.findall(r"Comparing Output: '([^']+)'", text)))
    saved_mb = saved.stat().st_size / 2**20
    saved.unlink()
    write_result(out, {"phases": ph.times, "tensors_compared": compared, "saved_outputs_mb": round(saved_mb, 1),
                       "versions": versions("polygraphy", "onnxruntime", "numpy")})


if __name__ == "__main__":
    main()
