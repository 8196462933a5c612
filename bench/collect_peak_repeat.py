"""Is calib collect's peak memory flat in N, or does one run per size just differ? Repeat and see.

    python bench/collect_peak_repeat.py [--model orientation] [--sizes 100,2000] [--repeat 4]

Runs ``calib collect`` (the peers' calib venv, batch 20 as in the suites) ``repeat`` times per size,
each measured like a peers job (``procmon``: peak RSS of the process tree, wall time), interleaving
the sizes so drift on the machine hits both alike. Writes bench/results/collect-peak-repeat.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from models import WORK, calib_path, model_path  # noqa: E402
from procmon import run_measured  # noqa: E402
from run import VENVS, machine  # noqa: E402

BENCH = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="orientation")
    ap.add_argument("--sizes", default="100,2000")
    ap.add_argument("--repeat", type=int, default=4)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    calib = str(VENVS / "calib" / "bin" / "calib")
    out = WORK / "collect-repeat"
    peaks: dict[int, list[float]] = {n: [] for n in sizes}
    walls: dict[int, list[float]] = {n: [] for n in sizes}
    for i in range(args.repeat):
        for n in sizes:
            d = out / f"{n}-{i}"
            d.mkdir(parents=True, exist_ok=True)
            argv = [calib, "collect", str(model_path(args.model)), "--data", str(calib_path(args.model, n)),
                    "-o", str(d / "stats.npz"), "--batch-size", "20"]
            r = run_measured(argv, log_dir=d, cwd=BENCH.parent, timeout_s=1200, mem_limit_mb=10240)
            if r.returncode != 0:
                print(f"N={n} run {i}: exit {r.returncode}: {r.stderr_tail[-300:]}")
                return 1
            peaks[n].append(r.peak_rss_mb)
            walls[n].append(r.wall_s)
            print(f"N={n} run {i}: peak {r.peak_rss_mb:.0f} MB, {r.wall_s:.1f} s", flush=True)
    mach = machine()
    cmd = " ".join(["python bench/collect_peak_repeat.py", *sys.argv[1:]])
    lines = [f"# `calib collect` peak memory, repeated ({args.model})", "",
             f"Command: `{cmd}`; {time.strftime('%Y-%m-%d')}, {mach['cpu']}, {mach['cores']} cores, "
             f"{mach['mem_gib']} GiB. Peak RSS of the process tree (procmon, as in the peers suites), batch 20.", "",
             "| N | runs | peak MB, each run | min | median | max | wall s (median) |", "|---|---|---|---|---|---|---|"]
    for n in sizes:
        p = peaks[n]
        lines.append(f"| {n} | {len(p)} | {', '.join(f'{x:.0f}' for x in p)} | {min(p):.0f} | "
                     f"{statistics.median(p):.0f} | {max(p):.0f} | {statistics.median(walls[n]):.1f} |")
    lo, hi = sizes[0], sizes[-1]
    lines += ["", f"Largest N against smallest: median {statistics.median(peaks[hi]) / statistics.median(peaks[lo]):.2f}×, "
              f"max {max(peaks[hi]) / max(peaks[lo]):.2f}×; spread within N = {lo}: "
              f"{max(peaks[lo]) / min(peaks[lo]):.2f}× (max / min)."]
    (BENCH / "results" / "collect-peak-repeat.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
