"""Re-calibrate in seconds: drop 2 of 256 demo samples and re-calibrate from the run's shards.

1. builds (or reuses) the demo pages (256 calibration pages, ``datasets/doc_pages.py``);
2. records one run of the demo model on them (every method, statistics kept per shard);
3. drops two samples and times ``calib.recalibrate.recalibrate`` (what the dashboard's
   "Re-calibrate" runs): the untouched shards are merged, the touched ones collected again;
4. checks the new run's statistics and ranges against a fresh ``collect`` on the remaining
   254 samples, bit for bit (every histogram count, min, max; every method's amax);
5. writes ``bench/results/recalibrate.md`` (machine, command, figures).

Run: ``PYTHONPATH=. python bench/recalibrate.py [--work bench/.work/recalibrate] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from calib.calibrate import calibrate_all
from calib.collect import collect
from calib.demo import build_demo_data, demo_config
from calib.pipeline import execute, open_run_data
from calib.recalibrate import load_shards, recalibrate
from calib.runs import RunStore

REPO = Path(__file__).resolve().parent.parent
N_CALIB = 256
DROP_AT = (40, 200)  # positions in the run's sample order: two different shards are touched


def machine() -> str:
    cpu = ""
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                   if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{platform.system()} {platform.release()}, {cpu or platform.processor()}, "
            f"{os.cpu_count()} logical CPUs visible, Python {platform.python_version()}")


def base_run(work: Path):
    data = build_demo_data(work / "pages", N_CALIB, 192)  # the demo's own sizes
    store = RunStore(work / "store")
    for r in store.runs():
        if r.is_complete and load_shards(r) is not None and load_shards(r).index is not None:
            return store, r
    cfg = demo_config(data, store.root)
    cfg.eval_data, cfg.compare, cfg.html, cfg.target, cfg.primary = None, False, False, "", "entropy"
    t = time.perf_counter()
    run = execute(cfg, store=store, command=["bench/recalibrate.py"])
    print(f"base run {run.id} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return store, run


def identical(a, b) -> list[str]:
    """Differences between two ActivationStats' histograms (empty: bit for bit equal)."""
    bad = []
    for t, h in a.tensors.items():
        g = b.tensors.get(t)
        if g is None or (h.exp, h.min, h.max, h.n, h.n_nonfinite) != (g.exp, g.min, g.max, g.n, g.n_nonfinite) \
                or not all(np.array_equal(x, y) for x, y in zip(_counts(h), _counts(g))):
            bad.append(t)
    return bad + [t for t in b.tensors if t not in a.tensors]


def _counts(h):
    return [v for k, v in sorted(vars(h).items()) if isinstance(v, np.ndarray)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=REPO / "bench" / ".work" / "recalibrate")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    store, run = base_run(args.work)
    from calib.model import load_model

    model = load_model(run.manifest["model"]["path"])
    src = open_run_data(Path(run.manifest["data"]["path"]), model)
    shards = load_shards(run)
    ids = [i for g in shards.groups for i in g]
    drop = [ids[k] for k in DROP_AT]
    keep = [i for i in ids if i not in drop]
    assert len(ids) == N_CALIB and len(keep) == N_CALIB - 2, (len(ids), len(keep))
    times, result = [], None
    for _ in range(args.repeat):
        t = time.perf_counter()
        result = recalibrate(store, run, model, src, keep, command=["bench/recalibrate.py"])
        times.append(time.perf_counter() - t)
    new = result.run
    from calib.stats import ActivationStats

    merged = ActivationStats.load(new.artifact("stats"))
    t = time.perf_counter()
    fresh = collect(model, src.subset([ids.index(i) for i in keep]), batch_size=16)
    t_fresh = time.perf_counter() - t
    diff_stats = identical(merged, fresh)
    ra, rb = calibrate_all(merged, list(new.read_json("config")["methods"])), calibrate_all(fresh, list(
        new.read_json("config")["methods"]))
    diff_ranges = [(m, t) for m in ra for t in ra[m].tensors if ra[m].tensors[t].amax != rb[m].tensors[t].amax]
    n_ranges = sum(len(r.tensors) for r in ra.values())
    from calib.calibrate import load_ranges

    saved = load_ranges(new.artifact("ranges"))
    diff_saved = [(m, t) for m in saved for t in saved[m].tensors if saved[m].tensors[t].amax != rb[m].tensors[t].amax]
    lines = [
        "# Re-calibrate after dropping 2 of 256 samples (demo)", "",
        f"- machine: {machine()}",
        f"- command: `PYTHONPATH=. python bench/recalibrate.py --work {args.work} --repeat {args.repeat}` "
        "(on a machine shared with other jobs)",
        f"- base run: `{run.id}`: {N_CALIB} demo pages, shards of {shards.size} samples ({len(shards.groups)} shards)",
        f"- dropped: {', '.join(drop)}",
        f"- re-calibrate (`calib.recalibrate.recalibrate`, what the dashboard runs; model and data already open; "
        f"the first run also loads numba's kernels): median {statistics.median(times):.2f} s over {len(times)} runs "
        f"({', '.join(f'{x:.2f}' for x in times)} s)",
        f"- shards reused {result.reused}, collected again {result.recollected} "
        f"({result.samples_collected} samples); the new run writes its shards, stats, the shipped method's ranges, "
        "the Q/DQ model, the TensorRT cache and scales.json (no compare, no new advise: 'ranges only')",
        "- where the time goes (last run, s): " + ", ".join(f"{k} {v}" for k, v in
                                                            new.manifest.get("timings_s", {}).items()),
        f"- a fresh collection on the remaining {len(keep)} samples took {t_fresh:.2f} s (for scale)",
        f"- statistics equal bit for bit: {'yes' if not diff_stats else 'NO: ' + ', '.join(diff_stats[:5])} "
        f"({len(fresh.tensors)} tensors: counts, exponent, min, max, n)",
        f"- ranges equal bit for bit: {'yes' if not diff_ranges and not diff_saved else 'NO'} "
        f"({n_ranges} amax values of {len(ra)} methods computed from the merged statistics; the new run's "
        f"ranges.json ({', '.join(saved)}: the shipped model's method, 'ranges only' calibrates no other): "
        f"{'equal' if not diff_saved else f'{len(diff_saved)} differ'})",
        f"- load while measuring: {os.getloadavg()[0]:.1f} (1-minute load average; 2 CPUs)",
    ]
    out = REPO / "bench" / "results" / "recalibrate.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    for r in RunStore(args.work / "store").runs():  # keep the base run only
        if r.id != run.id:
            shutil.rmtree(r.dir)
    return 0 if not diff_stats and not diff_ranges and not diff_saved else 1


if __name__ == "__main__":
    sys.exit(main())
