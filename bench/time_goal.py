"""The peers suite's time goal, measured alone and paired: calib's collect + calibrate against ONNX Runtime's
Entropy calibrator with 2048 bins, at N = 500 on the ResNet.

    bench/.venvs/prep/bin/python bench/time_goal.py [--model resnet_fmnist] [--n 500] [--pairs 5]
                                                    [--out bench/results/time-goal.md]

The suite runs each job once, among a few hundred others, so its ratio carries whatever else the machine did at
that moment. Here the same two sides run alternately (one warm-up pair, then ``--pairs`` counted pairs, the
order flipped every pair), each as the suite runs it (``bench/peers/run.py``): calib = ``calib collect`` +
``calib calibrate --method all`` + ``calib export --method entropy`` (three processes, start-up included, in
the suite's calib venv); ONNX Runtime = ``tools/ort_job.py --method entropy2048`` (one process: load,
calibrate, write the model) on a private copy of the FP32 model. Each process is measured by ``procmon``
(wall time, CPU time of the tree, peak RSS). The ratio is taken pair by pair (ORT / calib) and its median
reported, for wall time and for CPU time; the Markdown table, with machine and command, goes to ``--out``.
calib's sources are byte-compiled first (``harness.compile_calib``), as a wheel install would have them.
The calib venv must carry this checkout's pins (``pip install -e .`` there after a pin changes); its
``ml_dtypes`` version is recorded because it alone moves calib's start-up by about a second per process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
from harness import TOOLS_DIR, calib_cmd, calib_env, machine, venv_python  # noqa: E402
from models import WORK, calib_path, model_path  # noqa: E402
from procmon import run_measured  # noqa: E402

BATCH = 20  # the suite's calibration batch (bench/peers/run.py)


def calib_side(model: str, n: int, d: Path) -> dict:
    stats, ranges, out = d / "stats.npz", d / "ranges.json", d / "entropy.int8.onnx"
    steps = [["collect", str(model_path(model)), "--data", str(calib_path(model, n)), "-o", str(stats),
              "--batch-size", str(BATCH)],
             ["calibrate", str(stats), "--method", "all", "-o", str(ranges)],
             ["export", str(model_path(model)), "--stats", str(stats), "--method", "entropy", "-o", str(out)]]
    wall = cpu = peak = 0.0
    for k, args in enumerate(steps):
        r = run_measured([calib_cmd(), *args], log_dir=d / f"step{k}", env=calib_env())
        if r.returncode != 0:
            raise SystemExit(f"calib {args[0]} failed ({r.returncode}): {r.stderr_tail.strip()[-300:]}")
        wall, cpu, peak = wall + r.wall_s, cpu + r.cpu_s, max(peak, r.peak_rss_mb)
    return {"wall_s": wall, "cpu_s": cpu, "peak_mb": peak}


def ort_side(model: str, n: int, d: Path) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    fp32 = d / "fp32_input.onnx"
    shutil.copyfile(model_path(model), fp32)
    argv = [str(venv_python("ort")), str(TOOLS_DIR / "ort_job.py"), "--model", str(fp32), "--calib",
            str(calib_path(model, n)), "--out", str(d), "--method", "entropy2048"]
    r = run_measured(argv, log_dir=d)
    if r.returncode != 0:
        raise SystemExit(f"ORT entropy2048 failed ({r.returncode}): {r.stderr_tail.strip()[-300:]}")
    return {"wall_s": r.wall_s, "cpu_s": r.cpu_s, "peak_mb": r.peak_rss_mb}


def version(python: Path, dist: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.strip() or "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet_fmnist")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "time-goal.md")
    a = ap.parse_args(argv)
    if not calib_path(a.model, a.n).exists():
        raise SystemExit(f"{calib_path(a.model, a.n)} is missing: run bench/peers/prepare.py --models {a.model} "
                         f"--sizes {a.n} first")
    root = WORK / "time_goal" / a.model
    rows = []
    t0 = time.time()
    for k in range(a.pairs + 1):
        order = ("calib", "ort") if k % 2 == 0 else ("ort", "calib")
        got = {}
        for side in order:
            d = root / f"pair{k}" / side
            shutil.rmtree(d, ignore_errors=True)
            got[side] = calib_side(a.model, a.n, d) if side == "calib" else ort_side(a.model, a.n, d)
        print(f"pair {k} of {a.pairs} ({'warm-up' if k == 0 else 'counted'}): calib {got['calib']['wall_s']:.2f} s, "
              f"ORT {got['ort']['wall_s']:.2f} s", flush=True)
        if k:
            rows.append(got)
    med = {f"{s}_{m}": statistics.median(r[s][m] for r in rows) for s in ("calib", "ort")
           for m in ("wall_s", "cpu_s", "peak_mb")}
    ratio_wall = statistics.median(r["ort"]["wall_s"] / r["calib"]["wall_s"] for r in rows)
    ratio_cpu = statistics.median(r["ort"]["cpu_s"] / r["calib"]["cpu_s"] for r in rows)
    m = machine()
    lines = [
        "# Time goal: calib collect + calibrate against ONNX Runtime Entropy 2048, paired", "",
        f"Command: `bench/.venvs/prep/bin/python bench/time_goal.py --model {a.model} --n {a.n} --pairs {a.pairs}` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(t0))}; {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB; "
        f"{time.time() - t0:.0f} s). calib venv: ml_dtypes {version(venv_python('calib'), 'ml_dtypes')}, "
        f"onnx {version(venv_python('calib'), 'onnx')}; ORT venv: onnxruntime {version(venv_python('ort'), 'onnxruntime')}.",
        "",
        "calib = `calib collect` + `calib calibrate --method all` + `calib export --method entropy` (three processes, "
        "start-up included); ORT = `tools/ort_job.py --method entropy2048` (one process). One warm-up pair, then "
        "alternating order; medians of the counted pairs, ratios pair by pair. calib's sources are byte-compiled "
        "first, as installing a wheel does (`harness.compile_calib`; this environment sets PYTHONDONTWRITEBYTECODE="
        f"{os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r}, under which an editable install recompiles about a "
        "hundred modules in every process).", "",
        "| pair | calib wall s | calib CPU s | ORT wall s | ORT CPU s | ORT / calib (wall) | ORT / calib (CPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, r in enumerate(rows, 1):
        c, o = r["calib"], r["ort"]
        lines.append(f"| {k} | {c['wall_s']:.2f} | {c['cpu_s']:.2f} | {o['wall_s']:.2f} | {o['cpu_s']:.2f} | "
                     f"{o['wall_s'] / c['wall_s']:.2f} | {o['cpu_s'] / c['cpu_s']:.2f} |")
    goal = "met" if ratio_wall >= 5 else "missed"
    lines += ["", f"Median: calib {med['calib_wall_s']:.2f} s wall / {med['calib_cpu_s']:.2f} s CPU (peak "
              f"{med['calib_peak_mb']:.0f} MB), ORT {med['ort_wall_s']:.2f} s / {med['ort_cpu_s']:.2f} s (peak "
              f"{med['ort_peak_mb']:.0f} MB). **Ratio {ratio_wall:.2f}× wall (goal ≥ 5×: {goal}), "
              f"{ratio_cpu:.2f}× CPU.**", ""]
    a.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
