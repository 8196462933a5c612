"""Per-layer FP32-vs-INT8 comparison: calib compare against Polygraphy's own workflow.

Model: PP-OCR's text-line direction classifier (MobileNetV3-small, input 3x48x192,
``rapidocr_onnxruntime``), upgraded to opset 17 by calib's loader and saved, so both
tools read the same FP32 file. INT8: calib's Q/DQ export (entropy, TensorRT placement)
calibrated on 64 crops. Evaluation data: N crops of the two scikit-learn sample photos
(real pixels), the same arrays for both tools.

What a Polygraphy user runs (every tensor marked, results saved, then compared):

    polygraphy run fp32.onnx --onnxrt --onnx-outputs mark all --load-inputs inputs_N.json \
        --save-outputs fp32_N.json
    polygraphy run int8.onnx --onnxrt --onnx-outputs mark all --load-inputs inputs_N.json \
        --load-outputs fp32_N.json

What calib runs (in-process library call in a fresh process; same data as .npz):

    calib compare fp32.onnx int8.onnx --data eval_N.npz -o compare_N.json

Each command runs as its own process; wall time and peak RSS (``os.wait4`` rusage
of that process) are recorded. Writing the Polygraphy input JSON is not timed.

    python bench/bench_compare.py [--sizes 100 2000] [--out bench/results/compare.md] [--no-polygraphy]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HW = (48, 192)


def crops(n: int, seed: int) -> np.ndarray:
    """Random crops of scikit-learn's two sample photos, resized to 48x192, normalised like PP-OCR (x/255-0.5)/0.5."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    h, w = HW
    out = np.empty((n, 3, h, w), np.float32)
    for i in range(n):
        im = photos[i % len(photos)]
        scale = rng.uniform(0.2, 0.9)
        ch = int(min(im.shape[0], im.shape[1] * h / w) * scale)
        cw = int(ch * w / h)
        y0, x0 = rng.integers(0, im.shape[0] - ch + 1), rng.integers(0, im.shape[1] - cw + 1)
        pil = Image.fromarray(im[y0:y0 + ch, x0:x0 + cw]).resize((w, h), Image.BILINEAR)
        out[i] = ((np.asarray(pil, np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def prepare(work: Path, sizes: list[int], polygraphy: bool) -> None:
    import onnx

    from calib.calibrate import calibrate
    from calib.collect import collect
    from calib.data import ListSource, Sample
    from calib.export import export_qdq
    from calib.model import load_model

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "int8.onnx").exists():
        pkg = importlib.util.find_spec("rapidocr_onnxruntime").submodule_search_locations[0]
        m = load_model(os.path.join(pkg, "models", "ch_ppocr_mobile_v2.0_cls_infer.onnx"))
        onnx.save(m.proto, work / "fp32.onnx")
        m = load_model(work / "fp32.onnx")
        cal = crops(64, seed=1)
        name = m.inputs[0].name
        stats = collect(m, ListSource([Sample(f"c{i}", {name: cal[i]}) for i in range(len(cal))]))
        q = export_qdq(m, calibrate(stats, "entropy"))
        q.save(work / "int8.onnx")
    from calib.model import load_model as _lm

    name = _lm(work / "fp32.onnx").inputs[0].name
    full = None
    for n in sizes:
        if not (work / f"eval_{n}.npz").exists():
            full = crops(max(sizes), seed=2) if full is None else full
            np.savez(work / f"eval_{n}.npz", **{name: full[:n]})
        if polygraphy and not (work / f"inputs_{n}.json").exists():
            from polygraphy.json import save_json

            x = np.load(work / f"eval_{n}.npz")[name]
            save_json([{name: x[i:i + 1]} for i in range(n)], str(work / f"inputs_{n}.json"))


def measure(argv: list[str], log: Path) -> dict:
    """Run ``argv`` as a child process; wall seconds and peak RSS (MiB) of that process."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    return {"argv": argv, "seconds": round(wall, 2), "peak_rss_mib": round(ru.ru_maxrss / 1024, 1), "exit": code}


class RawStream:
    """Samples read one at a time from a raw .npy file with plain reads (no mmap, nothing retained).

    A second reader beside ``NpzSource`` (which streams .npz members sample by sample): both must
    give a flat peak, showing that compare itself keeps nothing per sample.
    """

    layout = "batch"

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            self.shape, _, self.dtype = read(f)
            self.offset = f.tell()
        self.item = int(np.prod(self.shape[1:])) * np.dtype(self.dtype).itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self):
        from calib.data import Sample

        with open(self.path, "rb", buffering=0) as f:
            for i in range(self.shape[0]):
                f.seek(self.offset + i * self.item)
                x = np.frombuffer(f.read(self.item), dtype=self.dtype).reshape(self.shape[1:])
                yield Sample(f"{self.path.name}[{i}]", {self.name: x})


def calib_child(work: Path, n: int, stream: bool = False) -> None:
    from calib.compare import compare
    from calib.data import NpzSource
    from calib.model import load_model

    fm = load_model(work / "fp32.onnx")
    if stream:
        npy = work / f"eval_{n}.npy"
        if not npy.exists():
            np.save(npy, np.load(work / f"eval_{n}.npz")[fm.inputs[0].name])
        src = RawStream(npy, fm.inputs[0].name)
    else:
        src = NpzSource(work / f"eval_{n}.npz", fm.inputs)
    t0 = time.perf_counter()
    r = compare(fm, load_model(work / "int8.onnx"), src, batch_size=16)
    r.save(work / f"compare_{n}.json")
    print(json.dumps({"compare_seconds": round(time.perf_counter() - t0, 2), "layers": len(r.layers),
                      "samples": r.n_samples, "output": r.outputs}))


def advise_rows(work: Path, n_eval: int, target: str) -> list[dict]:
    """calib advise on the same model, beside plain INT8 and ONNX Runtime's quantize_static (same data)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from calib.calibrate import calibrate
    from calib.collect import collect
    from calib.compare import advise, compare
    from calib.data import ListSource, Sample
    from calib.export import export_qdq
    from calib.model import load_model

    fm = load_model(work / "fp32.onnx")
    name = fm.inputs[0].name
    cal = crops(64, seed=1)
    ev = crops(n_eval, seed=3)
    cal_src = ListSource([Sample(f"c{i}", {name: cal[i]}) for i in range(len(cal))])
    ev_src = ListSource([Sample(f"e{i}", {name: ev[i]}) for i in range(len(ev))])
    stats = collect(fm, cal_src)
    rows = []

    def score(label: str, qdq, seconds: float, n_float: int | str = 0) -> None:
        r = compare(fm, qdq, ev_src, layers=False).outputs[fm.output_names[0]]
        rows.append({"quantizer": label, "cosine": round(r["cosine"], 5), "top1": round(r["top1_agreement"], 4),
                     "float_nodes": n_float, "seconds": round(seconds, 1)})
        print(rows[-1], flush=True)

    for m in ("entropy", "percentile", "minmax"):
        t0 = time.perf_counter()
        q = export_qdq(fm, calibrate(stats, m))
        score(f"calib export {m} (plain INT8)", q, time.perf_counter() - t0)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{name: cal[i:i + 1]} for i in range(len(cal))])

        def get_next(self):
            return next(self.it, None)

    for method_name in ("MinMax", "Percentile"):
        from onnxruntime.quantization import CalibrationMethod

        t0 = time.perf_counter()
        out = work / f"ort_{method_name}.onnx"
        quantize_static(str(work / "fp32.onnx"), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=getattr(CalibrationMethod, method_name),
                        extra_options={"ActivationSymmetric": True})
        score(f"ONNX Runtime quantize_static {method_name}", load_model(out), time.perf_counter() - t0)
    t0 = time.perf_counter()
    adv = advise(fm, stats, ev_src, target=target, output=work / "advised.onnx")
    score(f"calib advise --target {target}", adv.qdq, time.perf_counter() - t0, len(adv.exclude))
    rows[-1]["changed_methods"] = len(adv.changed)
    rows[-1]["steps"] = len(adv.curve) - 1
    return rows


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import onnxruntime
    import polygraphy

    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, onnxruntime {onnxruntime.__version__}, polygraphy {polygraphy.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 2000])
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / ".work" / "compare")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compare.md")
    ap.add_argument("--no-polygraphy", action="store_true", help="Measure calib only.")
    ap.add_argument("--polygraphy-sizes", type=int, nargs="*", default=None,
                    help="Sizes to run Polygraphy at (default: all --sizes).")
    ap.add_argument("--reuse-polygraphy", action="store_true",
                    help="Reuse Polygraphy rows measured earlier (WORK/rows.json) instead of running them again.")
    ap.add_argument("--advise", action="store_true", help="Also run calib advise against plain INT8 and ORT.")
    ap.add_argument("--advise-target", default="cosine:0.99")
    ap.add_argument("--advise-eval", type=int, default=200)
    ap.add_argument("--child-calib", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-stream", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child_calib is not None:
        calib_child(a.work, a.child_calib, a.child_stream)
        return
    poly_sizes = [] if a.no_polygraphy else (a.polygraphy_sizes if a.polygraphy_sizes is not None else a.sizes)
    prepare(a.work, a.sizes, bool(poly_sizes))
    rows = []
    for n in a.sizes:
        r = measure([sys.executable, __file__, "--work", str(a.work), "--child-calib", str(n)], a.work / f"calib_{n}.log")
        r.update(tool="calib compare", n=n)
        rows.append(r)
        print(r, flush=True)
    for n in a.sizes:
        r = measure([sys.executable, __file__, "--work", str(a.work), "--child-calib", str(n), "--child-stream"],
                    a.work / f"calib_stream_{n}.log")
        r.update(tool="calib compare (streamed .npy reader)", n=n)
        rows.append(r)
        print(r, flush=True)
    pg = shutil.which("polygraphy") or str(Path(sys.executable).with_name("polygraphy"))
    old = json.loads((a.work / "rows.json").read_text()) if (a.work / "rows.json").exists() else []
    for n in poly_sizes:
        kept = [r for r in old if r["n"] == n and r["tool"].startswith("polygraphy")]
        if a.reuse_polygraphy and len(kept) == 3:
            rows.extend(r | {"reused": True} for r in kept)
            continue
        w = a.work
        r1 = measure([pg, "run", str(w / "fp32.onnx"), "--onnxrt", "--onnx-outputs", "mark", "all",
                      "--load-inputs", str(w / f"inputs_{n}.json"), "--save-outputs", str(w / f"fp32_{n}.json")],
                     w / f"poly_fp32_{n}.log")
        r2 = measure([pg, "run", str(w / "int8.onnx"), "--onnxrt", "--onnx-outputs", "mark", "all",
                      "--load-inputs", str(w / f"inputs_{n}.json"), "--load-outputs", str(w / f"fp32_{n}.json")],
                     w / f"poly_int8_{n}.log")
        rows.append({"tool": "polygraphy run (FP32, save)", "n": n, **r1})
        rows.append({"tool": "polygraphy run (INT8, compare)", "n": n, **r2})
        rows.append({"tool": "polygraphy total", "n": n, "seconds": round(r1["seconds"] + r2["seconds"], 2),
                     "peak_rss_mib": max(r1["peak_rss_mib"], r2["peak_rss_mib"]), "exit": max(r1["exit"], r2["exit"])})
        print(rows[-3:], flush=True)
        for f in (w / f"fp32_{n}.json",):
            f.unlink(missing_ok=True)
    from calib.io import write_json

    write_json(a.work / "rows.json", rows + [r for r in old if (r["tool"], r["n"]) not in
                                             {(x["tool"], x["n"]) for x in rows}])
    adv = advise_rows(a.work, a.advise_eval, a.advise_target) if a.advise else []
    write_results(a, rows, adv)


def extrapolation(by: dict, ns: list[int]) -> list[str]:
    """Polygraphy at the largest size does not fit this machine: say so, from its measured growth."""
    top = ns[-1]
    pn = [n for n in ns if ("polygraphy total", n) in by]
    k = by.get(("calib compare", top))
    if not k or top in pn or len(pn) < 2:
        return []
    a, b = by[("polygraphy total", pn[0])], by[("polygraphy total", pn[-1])]
    per = (b["peak_rss_mib"] - a["peak_rss_mib"]) / (pn[-1] - pn[0])
    need = (b["peak_rss_mib"] + per * (top - pn[-1])) / 1024
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return [f"At {top} samples: calib takes {k['seconds']} s. Polygraphy's peak RSS grows by {per:.0f} MiB per "
            f"sample ({pn[0]} -> {pn[-1]}: {a['peak_rss_mib']} -> {b['peak_rss_mib']} MiB), so {top} samples would "
            f"need about {need:.0f} GiB; this machine has {mem:.0f} GiB, so it was not run there. Even with "
            f"{top // pn[-1]}x fewer samples ({pn[-1]}) Polygraphy takes {b['seconds']} s, "
            f"{b['seconds'] / k['seconds']:.0f}x calib's time for all {top}."]


def write_results(a, rows: list[dict], adv: list[dict]) -> None:
    from calib.io import write_text

    by = {(r["tool"], r["n"]): r for r in rows}
    lines = ["# calib compare vs Polygraphy per-layer comparison", "",
             f"Machine: {machine()}", "",
             f"Command: `python bench/bench_compare.py --sizes {' '.join(map(str, a.sizes))}`"
             + (f" `--polygraphy-sizes {' '.join(map(str, a.polygraphy_sizes))}`" if a.polygraphy_sizes else "")
             + (" `--reuse-polygraphy` (Polygraphy rows measured by an earlier run of this script, same data and "
                "models)" if a.reuse_polygraphy else "") + (" `--advise`" if a.advise else ""), "",
             f"Load average when written: {os.getloadavg()[0]:.2f} (other jobs share this machine; timings are "
             "wall clock of each process, peak RSS from its rusage).", "",
             "Model: ch_ppocr_mobile_v2.0_cls (opset 17 working copy) vs calib's Q/DQ export (entropy, trt); "
             "data: crops of scikit-learn's sample photos, 3x48x192.", "",
             "| tool | samples | wall s | peak RSS MiB | exit |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['tool']} | {r['n']} | {r['seconds']} | {r['peak_rss_mib']} | {r['exit']} |")
    lines.append("")
    lines.append("Polygraphy's exit code 1 is its verdict (outputs differ beyond its default tolerances), not a crash.")
    lines.append("")
    ns = sorted({r["n"] for r in rows})
    for tool in ("calib compare", "calib compare (streamed .npy reader)"):
        c = [by.get((tool, n)) for n in ns]
        c = [x for x in c if x]
        if len(c) >= 2:
            lo, hi = c[0], c[-1]
            growth = 100 * (hi["peak_rss_mib"] - lo["peak_rss_mib"]) / lo["peak_rss_mib"]
            lines.append(f"{tool}: peak RSS from {lo['n']} to {hi['n']} samples {lo['peak_rss_mib']} -> "
                         f"{hi['peak_rss_mib']} MiB ({growth:+.1f} %).")
    lines.append("`NpzSource` streams the .npz sample by sample and compare folds each batch into streaming sums, "
                 "so peak memory does not depend on the number of samples (a plain raw-file reader gives the same).")
    for n in ns:
        p, k = by.get(("polygraphy total", n)), by.get(("calib compare", n))
        if p and k:
            lines.append(f"At {n} samples calib is {p['seconds'] / k['seconds']:.1f}x faster than the Polygraphy "
                         f"workflow and uses {p['peak_rss_mib'] / k['peak_rss_mib']:.1f}x less peak memory.")
    lines += extrapolation(by, ns)
    lines.append("")
    lines.append("Both tools compare the same tensors' values; calib marks only the tensors it compares "
                 "(node outputs, not Q/DQ intermediates), runs batches of 16 and folds each batch into "
                 "streaming float64 sums; Polygraphy runs one sample per iteration, keeps every iteration's "
                 "outputs, writes them to JSON, reads them back and compares output by output.")
    if adv:
        lines += ["", f"## Mixed precision: calib advise (target {a.advise_target}) on the same model", "",
                  f"Calibration: 64 crops (seed 1); evaluation: {a.advise_eval} other crops (seed 3); metric: output "
                  "cosine (mean per sample) and top-1 agreement against FP32, ONNX Runtime with optimisations off "
                  "(exact Q/DQ semantics). ONNX Runtime's quantize_static: QDQ, int8 symmetric activations, "
                  "per-channel int8 weights, same 64 crops.", "",
                  "| quantizer | output cosine | top-1 agreement | float nodes | seconds |", "|---|---:|---:|---:|---:|"]
        for r in adv:
            extra = f" ({r['steps']} steps, {r['changed_methods']} tensors with another method)" if "steps" in r else ""
            lines.append(f"| {r['quantizer']}{extra} | {r['cosine']} | {r['top1']} | {r['float_nodes']} | "
                         f"{r['seconds']} |")
    write_text(a.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
