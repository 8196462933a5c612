"""Is one INT8 classifier really more accurate than another? A paired test on the same samples.

    python bench/paired_accuracy.py MODEL A.onnx B.onnx [C.onnx ...]   (run with bench/.venvs/calib/bin/python)

MODEL is a peers-benchmark model name (its FP32 model and labelled evaluation set under bench/.work).
For every pair (FP32 and each INT8 model against the first INT8 model): accuracy of each, how often
each is right where the other is wrong, and the exact McNemar p-value (two-sided binomial test on
those discordant samples). Accuracy differences of a point over 1,000 samples are often a handful of
flipped predictions; this says whether they are.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from scipy.stats import binomtest

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from models import eval_path, model_path  # noqa: E402


def predictions(path: str, x: np.ndarray, name: str, batch: int = 100) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {name: x[i:i + batch]})[0].reshape(len(x[i:i + batch]), -1).argmax(1)
                           for i in range(0, len(x), batch)])


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__)
        return 2
    model, paths = argv[0], argv[1:]
    with np.load(eval_path(model), allow_pickle=False) as d:
        if "labels" not in d:
            print(f"{eval_path(model)} has no labels")
            return 2
        y = d["labels"]
        name = next(k for k in d.files if k != "labels")
        x = d[name]
    fp = str(model_path(model))
    preds = {"FP32": predictions(fp, x, name)}
    for p in paths:
        preds[p] = predictions(p, x, name)
    ref_name = paths[0]
    ref = preds[ref_name] == y
    print(f"{model}: {len(y)} labelled evaluation samples; reference A = {ref_name}\n")
    print("| model | accuracy % | agreement with FP32 % | right where A is wrong | A right where it is wrong | p (exact McNemar) |")
    print("|---|---|---|---|---|---|")
    for k, p in preds.items():
        ok = p == y
        b, c = int((ok & ~ref).sum()), int((~ok & ref).sum())
        pv = binomtest(b, b + c).pvalue if b + c else 1.0
        agree = float((p == preds["FP32"]).mean() * 100)
        print(f"| {k} | {ok.mean() * 100:.1f} | {agree:.1f} | {b} | {c} | {pv:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
