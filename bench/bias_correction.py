"""Bias correction on the peers benchmark's models: each calibration method with and without it.

    python bench/bias_correction.py [--models a,b] [--n 100]

Uses what ``bench/peers/run.py`` sets up (the ``calib`` and ``ort`` venvs, the models and data under
bench/.work; run a suite first). Per model: ``calib collect`` on N calibration samples, then per
method ``calib export`` three times: without ``--bias-data``, with it in ``--bias-mode mean`` and in the
default ``robust`` mode (the same N samples), each timed as a whole process; the INT8 models are scored by the peers' evaluator (same evaluation samples, same
metric as the peers table). Writes bench/results/bias-correction.jsonl and bias-correction.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from models import MODELS, WORK, calib_path, eval_path, model_path  # noqa: E402
from run import VENVS, EvalServer, machine  # noqa: E402

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
METHODS = ["minmax", "percentile", "entropy", "mse"]


def timed(argv: list[str], log: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        r = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, cwd=BENCH.parent)
    return time.perf_counter() - t0, r.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--n", type=int, default=100)
    args = ap.parse_args()
    calib = str(VENVS / "calib" / "bin" / "calib")
    out_dir = WORK / "bias"
    RESULTS.mkdir(exist_ok=True)
    jsonl = RESULTS / "bias-correction.jsonl"
    tmp = jsonl.with_suffix(".jsonl.tmp")
    command = ("python bench/bias_correction.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])).strip()
    ev = EvalServer(VENVS / "evaluate-bias.log")
    recs = []
    t_all = time.perf_counter()
    for model in args.models.split(","):
        d = out_dir / model
        d.mkdir(parents=True, exist_ok=True)
        data = str(calib_path(model, args.n))
        stats = d / "stats.npz"
        s, rc = timed([calib, "collect", str(model_path(model)), "--data", data, "-o", str(stats), "-b", "20"],
                      d / "collect.log")
        if rc:
            recs.append({"model": model, "status": "failed", "error": f"collect exit {rc} (log {d / 'collect.log'})"})
            continue
        for method in METHODS:
            row = {"model": model, "method": method, "n": args.n, "task": MODELS[model].task}
            for key in ("without", "mean", "with"):
                out = d / f"{method}.{key}.int8.onnx"
                argv = [calib, "export", str(model_path(model)), "--stats", str(stats), "-m", method, "-o", str(out)]
                if key != "without":
                    argv += ["--bias-data", data, "--bias-samples", str(args.n),
                             "--bias-mode", "mean" if key == "mean" else "robust"]
                log = d / f"{out.stem}.log"
                sec, rc = timed(argv, log)
                if rc:
                    row[key] = {"error": f"export exit {rc}: " + log.read_text(errors="replace").strip()[-300:]}
                    continue
                m = ev.request({"fp32": str(model_path(model)), "int8": str(out), "eval": str(eval_path(model)),
                                "task": MODELS[model].task, "cache": str(WORK / "fp32_outputs")})
                row[key] = {"export_s": round(sec, 2), **{k: m.get(k) for k in
                                                          ("primary", "primary_name", "top1_agreement", "accuracy_int8",
                                                           "cosine_mean", "map_iou", "eval_samples", "error") if k in m}}
            row.update(machine=machine(), command=command, time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            recs.append(row)
            w, mn, b = row.get("without", {}), row.get("mean", {}), row.get("with", {})
            print(f"[{model}] {method}: {w.get('primary')} -> mean {mn.get('primary')}, robust {b.get('primary')} "
                  f"(export {w.get('export_s')} s -> {b.get('export_s')} s)", flush=True)
    total = time.perf_counter() - t_all
    tmp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    tmp.replace(jsonl)
    write_md(recs, total, command)
    return 0


def write_md(recs: list[dict], total: float, command: str) -> None:
    mach = next((r["machine"] for r in recs if "machine" in r), {})
    lines = ["# Bias correction on the peers benchmark's models", "",
             f"Command: `{command}` ({total:.0f} s in all). Machine: {mach.get('cpu', '?')}, "
             f"{mach.get('cores', '?')} cores, {mach.get('mem_gib', '?')} GiB.", "",
             "Each row: `calib export` of one method without bias correction, with `--bias-mode mean` (every "
             "channel's mean shift taken off, as NNCF's fast bias correction does) and with the default "
             "`--bias-mode robust` (only where that lowers the channel's mean absolute error), all on the same "
             "calibration samples, scored by the peers' evaluator on the whole evaluation set. Metric as in the "
             "peers table: accuracy with labels (orientation, ResNet), top-1 agreement with FP32 (magika), IoU "
             "of the probability maps (detector), cosine × 100 (MiniLM). Fidelity: top-1 agreement with FP32 % "
             "or mean output cosine. Seconds: the export process, start to end.", "",
             "| model | method | without | mean | robust | robust − without | fidelity without → mean → robust "
             "| export s without → robust |",
             "|---|---|---|---|---|---|---|---|"]
    for r in recs:
        if r.get("status") == "failed":
            lines.append(f"| {r['model']} | – | failed: {r['error']} | | | | | |")
            continue
        w, mn, b = r.get("without", {}), r.get("mean", {}), r.get("with", {})

        def cell(x: dict) -> str:
            return "error" if "error" in x or x.get("primary") is None else f"{x['primary']:.2f}"

        delta = (f"{b['primary'] - w['primary']:+.2f}" if isinstance(w.get("primary"), float)
                 and isinstance(b.get("primary"), float) else "–")
        def fid(x: dict) -> str:
            if x.get("top1_agreement") is not None:
                return f"{x['top1_agreement']:.1f}"
            return f"{x['cosine_mean']:.4f}" if x.get("cosine_mean") is not None else "–"

        lines.append(f"| {r['model']} | {r['method']} | {cell(w)} | {cell(mn)} | {cell(b)} | {delta} | "
                     f"{fid(w)} → {fid(mn)} → {fid(b)} | {w.get('export_s', '–')} → {b.get('export_s', '–')} |")
    (RESULTS / "bias-correction.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
