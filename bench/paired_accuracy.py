"""Is one INT8 classifier really more accurate than another? A paired test on the same samples.

    python bench/paired_accuracy.py MODEL A.onnx B.onnx [C.onnx ...]   (run with bench/.venvs/calib/bin/python)
    python bench/paired_accuracy.py --quick MODEL [--out FILE]        (calib's default against every job)

MODEL is a peers-benchmark model name (its FP32 model and labelled evaluation set under bench/.work).
For every model (FP32 and each INT8 model) against the first INT8 model A: accuracy of each, its
agreement with FP32, how often each is right where A is wrong and the reverse, the accuracy difference
with a 95 % interval for paired proportions, and the exact McNemar p-value (two-sided binomial test on
those discordant samples). Accuracy differences of a point over 1,000 samples are often a handful of
flipped predictions; this says whether they are.

A path may end in ``@disable``: that model runs with ONNX Runtime's optimisation off (the spec evaluation,
Q/DQ computed as ONNX defines them: what the peers suite scores calib's TensorRT-target models by); other
models run with the default optimisation, as the suite scores the peers' models.

``--quick``: A is calib's default-path model of the quick suite at N = 128 (``calib quantize`` with no
option, ``@disable``); the others are every peer job at N = 128 and calib's single-method jobs found
under bench/.work/runs/quick/MODEL/. ``--out`` writes the table with machine and command to FILE
(Markdown), else it is printed.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from scipy.stats import binomtest

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from harness import RUNS, machine  # noqa: E402
from models import eval_path, model_path  # noqa: E402

N = 128
OPT = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}


def predictions(path: str, x: np.ndarray, name: str, batch: int = 100) -> np.ndarray:
    path, _, opt = path.partition("@")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = OPT[opt or "all"]
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {name: x[i:i + batch]})[0].reshape(len(x[i:i + batch]), -1).argmax(1)
                           for i in range(0, len(x), batch)])


def paired(ok: np.ndarray, ref: np.ndarray) -> tuple[int, int, float, float, float]:
    """Discordant counts (b: right where ref is wrong, c: the reverse), the accuracy difference ok - ref in
    points with its 95 % interval half-width (Wald interval for paired proportions), and McNemar's exact p."""
    n = len(ok)
    b, c = int((ok & ~ref).sum()), int((~ok & ref).sum())
    diff = (b - c) / n
    half = 1.96 * math.sqrt(max((b + c) / n - diff * diff, 0.0) / n)
    p = binomtest(b, b + c).pvalue if b + c else 1.0
    return b, c, diff * 100, half * 100, p


def quick_jobs(model: str) -> list[tuple[str, str]]:
    """(label, path[@disable]) of calib's default model first, then every peer and single-method job at N."""
    root = RUNS / "quick" / model
    jobs = [("calib default", f"{root / f'calib-{N}-quantize-default' / 'model.int8.onnx'}@disable")]
    for d in sorted(root.glob(f"calib-{N}-quantize-method-*")):
        jobs.append((f"calib --method {d.name.rsplit('-', 1)[1]}", f"{d / 'model.int8.onnx'}@disable"))
    for d in sorted(root.glob(f"*-{N}")):
        tool, _, variant = d.name[: -len(f"-{N}")].partition("-")
        if tool in ("ort", "modelopt", "nncf") and (d / "model.int8.onnx").exists():
            jobs.append((f"{tool} {variant}", str(d / "model.int8.onnx")))
    return [j for j in jobs if Path(j[1].partition("@")[0]).exists()]


def table(model: str, jobs: list[tuple[str, str]]) -> str:
    with np.load(eval_path(model), allow_pickle=False) as d:
        if "labels" not in d:
            raise SystemExit(f"{eval_path(model)} has no labels")
        y = d["labels"]
        name = next(k for k in d.files if k != "labels")
        x = d[name]
    fp = predictions(str(model_path(model)), x, name)
    preds = [("FP32", "", fp)] + [(label, path, predictions(path, x, name)) for label, path in jobs]
    ref_label, ref = jobs[0][0], preds[1][2] == y
    lines = [f"{model}: {len(y)} labelled evaluation samples; A = {ref_label}. Difference = accuracy minus A's, "
             "points, with its 95 % interval; p: exact McNemar test on the samples where exactly one is right.", "",
             "| model | accuracy % | agreement with FP32 % | right where A is wrong | A right where it is wrong "
             "| difference vs A (95 % interval) | p (exact McNemar) |",
             "|---|---|---|---|---|---|---|"]
    for label, _, p in preds:
        ok = p == y
        b, c, diff, half, pv = paired(ok, ref)
        agree = float((p == fp).mean() * 100)
        lines.append(f"| {label} | {ok.mean() * 100:.2f} | {agree:.2f} | {b} | {c} | {diff:+.2f} (±{half:.2f}) "
                     f"| {pv:.3f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("model")
    ap.add_argument("paths", nargs="*")
    args = ap.parse_args(argv)
    if args.quick:
        jobs = quick_jobs(args.model)
        if not jobs or not jobs[0][0].startswith("calib default"):
            print(f"no calib default model under {RUNS / 'quick' / args.model}", file=sys.stderr)
            return 2
    elif len(args.paths) >= 1:
        jobs = [(p, p) for p in args.paths]
    else:
        ap.print_usage()
        return 2
    text = table(args.model, jobs)
    if args.out is None:
        print(text)
        return 0
    m = machine()
    head = (f"Command: `python bench/paired_accuracy.py {' '.join(argv)}` "
            f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {m.get('cpu', platform.processor())}, "
            f"{m.get('cores', '?')} cores; onnxruntime {ort.__version__}). Models from "
            f"`bench/.work/runs/quick/{args.model}/` (calib's `@disable`: spec evaluation).\n\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    old = args.out.read_text() if args.out.exists() else "# Paired accuracy tests (quick suite, N = 128)\n"
    section = f"## {args.model}\n\n{head}{text}\n"
    parts = old.split(f"## {args.model}\n")
    if len(parts) > 1:  # replace this model's section
        rest = parts[1].split("\n## ", 1)
        old = parts[0] + (("## " + rest[1]) if len(rest) > 1 else "")
    args.out.write_text(old.rstrip() + "\n\n" + section)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
