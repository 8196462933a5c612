"""Is a difference between tools a property of the tool or of one calibration draw? Several draws tell.

    bench/.venvs/prep/bin/python bench/draws.py [--models fmnist_cnn,resnet_fmnist] [--draws 3]
                                                [--out bench/results/draws.md]

On the two Fashion-MNIST classifiers of the peers suite, the quick suite's single calibration set of 128
images leaves every TensorRT-valid tool within a few images of 10,000 of the others, and which one is ahead
changes with the draw. Here every tool quantizes the model from each of ``--draws`` disjoint calibration
sets of 128 images of the same pool (draw 0 is the quick suite's ``calib_128.npz``, checked byte for byte),
and every INT8 model is scored on the whole labelled evaluation set (10,000 test images). Tools and options
are the peers suite's (``bench/peers/run.py``: ONNX Runtime x 4, ModelOpt x 2, NNCF x 2, each in its own
venv through the same job scripts) and calib's default (``calib quantize MODEL --data CALIB -o OUT``, no
other option) and its single methods (``--method X``), from the calib venv.

Every model is scored by the spec evaluation (ONNX Runtime with its optimisation off: Q/DQ computed as ONNX
defines them, what TensorRT computes), so the table compares calibrations, not CPU kernels. Beside it, the
mean accuracy under ONNX Runtime's default session on the machine that ran the table: on an x86 CPU without
VNNI (AVX2 only) ORT's fused u8 x s8 kernels add pairs of products into int16 with saturation, which the
symmetric S8S8 models of ``quantize_static`` hit (``calib.cpu``; calib's ORT target avoids it, its TensorRT
target is not meant for that session), so that column is a fact about ORT on that CPU.
Per tool: accuracy of each draw, mean accuracy and mean top-1 agreement with FP32 over the draws, and
against calib's default the discordant samples summed over the draws (right where calib is wrong / the
reverse) with the exact two-sided binomial (McNemar) p-value of that sum.

Each job's predictions go to ``bench/.work/draws/MODEL/`` (a job already scored for the same FP32 model
and calibration file is not run again); the Markdown table, with machine and command, to ``--out``.
Nothing here chooses anything: calib's default chooses on its own selection split of each draw.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from scipy.stats import binomtest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
from harness import REPO, TOOLS_DIR, calib_cmd, calib_env, machine, venv_python  # noqa: E402
from models import MODELS, WORK, calib_path, model_path  # noqa: E402
from prepare import build_pool  # noqa: E402

N = 128
PEERS = [("ort", "minmax"), ("ort", "entropy"), ("ort", "entropy2048"), ("ort", "percentile"),
         ("modelopt", "entropy"), ("modelopt", "max"), ("nncf", "default"), ("nncf", "histogram")]
CALIB = [("calib", "default")] + [("calib", m) for m in ("minmax", "percentile", "entropy", "mse")]
OPT = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
TIMEOUT_S = 900


def cpu_flags() -> str:
    """The x86 features that decide ORT's int8 kernels (as ``calib.cpu`` reads them)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    have = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags.split()]
    return ", ".join(have) or "none of avx2/avx512/vnni/amx"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def predictions(path: Path, x: np.ndarray, name: str, opt: str, batch: int = 500) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = OPT[opt]
    so.intra_op_num_threads = 2
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {name: x[i:i + batch]})[0].reshape(len(x[i:i + batch]), -1).argmax(1)
                           for i in range(0, len(x), batch)])


def write_draws(model: str, draws: int, root: Path) -> list[Path]:
    """``draws`` disjoint calibration sets of N from the suite's pool recipe; draw 0 must equal calib_128.npz."""
    pool, _, _, _ = build_pool(model, N * draws, 1)
    key = next(iter(pool))
    out = []
    for k in range(draws):
        p = root / f"calib_draw{k}.npz"
        if not p.exists():
            np.savez(p, **{key: pool[key][k * N:(k + 1) * N]})
        out.append(p)
    with np.load(out[0]) as a, np.load(calib_path(model, N)) as b:
        if not np.array_equal(a[key], b[key]):
            raise SystemExit(f"{model}: draw 0 differs from the quick suite's {calib_path(model, N)}")
    return out


def run_job(tool: str, variant: str, fp32: Path, calib: Path, d: Path) -> tuple[Path, float]:
    d.mkdir(parents=True, exist_ok=True)
    int8 = d / "model.int8.onnx"
    if tool == "calib":
        argv = [calib_cmd(), "quantize", str(fp32), "--data", str(calib), "-o", str(int8)]
        argv += [] if variant == "default" else ["--method", variant]
        env = calib_env()
    else:
        private = d / "fp32_input.onnx"  # ModelOpt rewrites its input model in place (bench/peers/run.py)
        shutil.copyfile(fp32, private)
        argv = [str(venv_python(tool)), str(TOOLS_DIR / f"{tool}_job.py"), "--model", str(private),
                "--calib", str(calib), "--out", str(d), "--method", variant]
        env = None
    t0 = time.perf_counter()
    with open(d / "log.txt", "w") as log:
        r = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, timeout=TIMEOUT_S)
    wall = time.perf_counter() - t0
    if r.returncode != 0 or not int8.exists():
        raise RuntimeError(f"{tool}:{variant} failed ({r.returncode}); see {d / 'log.txt'}")
    return int8, wall


def collect(model: str, draws: int) -> dict:
    root = WORK / "draws" / model
    root.mkdir(parents=True, exist_ok=True)
    fp32 = model_path(model)
    fsha = sha(fp32)
    with np.load(WORK / "data" / model / "eval.npz") as z:
        name = next(k for k in z.files if k != "labels")
        x, y = z[name], z["labels"]
    ref = predictions(fp32, x, name, "all")
    rows = {"fp32_sha256": fsha, "n_eval": int(len(y)), "fp32_accuracy": float((ref == y).mean() * 100), "jobs": {}}
    for k, calib in enumerate(write_draws(model, draws, root)):
        csha = sha(calib)
        for tool, variant in PEERS + CALIB:
            label = f"{tool}:{variant}"
            d = root / f"draw{k}" / f"{tool}-{variant}"
            rec_path = d / "result.json"
            rec = json.loads(rec_path.read_text()) if rec_path.exists() else {}
            if rec.get("fp32_sha256") == fsha and rec.get("calib_sha256") == csha and "accuracy_ort" in rec:
                rows["jobs"].setdefault(label, {})[k] = rec
                continue
            int8 = d / "model.int8.onnx"
            try:
                if not (rec.get("fp32_sha256") == fsha and rec.get("calib_sha256") == csha and int8.exists()):
                    print(f"[{model}] draw {k + 1} of {draws}: {label}", flush=True)
                    int8, rec["wall_s"] = run_job(tool, variant, fp32, calib, d)
                pred = predictions(int8, x, name, "disable")
                pred_ort = predictions(int8, x, name, "all")
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                print(f"  failed: {e}", flush=True)
                continue
            np.save(d / "pred.npy", pred.astype(np.int16))
            rec = {"fp32_sha256": fsha, "calib_sha256": csha, "wall_s": rec.get("wall_s"),
                   "accuracy": float((pred == y).mean() * 100), "agreement": float((pred == ref).mean() * 100),
                   "accuracy_ort": float((pred_ort == y).mean() * 100)}
            rec_path.write_text(json.dumps(rec))
            rows["jobs"].setdefault(label, {})[k] = rec
    rows["pred"] = {label: {k: np.load(root / f"draw{k}" / label.replace(":", "-") / "pred.npy") for k in recs}
                    for label, recs in rows["jobs"].items()}
    rows["y"], rows["ref"] = y, ref
    return rows


def table(model: str, rows: dict, draws: int) -> str:
    y, pred = rows["y"], rows["pred"]
    a = pred.get("calib:default", {})
    lines = [f"## {model}", "",
             f"{rows['n_eval']} labelled test images; FP32 accuracy {rows['fp32_accuracy']:.2f} %; FP32 model sha256 "
             f"{rows['fp32_sha256'][:12]}; {draws} disjoint calibration draws of {N} (draw 0 = the quick suite's). "
             "b: right where calib's default is wrong, c: the reverse, summed over the draws; p: exact two-sided "
             "binomial test of b against b + c.", "",
             "| tool | " + " | ".join(f"acc. draw {k}" for k in range(draws)) +
             " | mean acc. % | mean agreement % | b | c | p | mean acc. %, ORT default session |",
             "|---|" + "---|" * (draws + 6)]
    order = sorted(rows["jobs"], key=lambda j: (j != "calib:default", not j.startswith("calib"), j))
    for label in order:
        recs = rows["jobs"][label]
        accs = [f"{recs[k]['accuracy']:.2f}" if k in recs else "–" for k in range(draws)]
        full = len(recs) == draws
        mean_acc = f"{np.mean([r['accuracy'] for r in recs.values()]):.3f}" if full else "–"
        mean_agr = f"{np.mean([r['agreement'] for r in recs.values()]):.3f}" if full else "–"
        ks = [k for k in recs if k in a]
        b = sum(int(((pred[label][k] == y) & (a[k] != y)).sum()) for k in ks)
        c = sum(int(((pred[label][k] != y) & (a[k] == y)).sum()) for k in ks)
        p = binomtest(b, b + c).pvalue if b + c else 1.0
        ort_acc = f"{np.mean([r['accuracy_ort'] for r in recs.values()]):.2f}" if full else "–"
        name = "**calib default**" if label == "calib:default" else label.replace("calib:", "calib --method ")
        lines.append(f"| {name} | " + " | ".join(accs) + f" | {mean_acc} | {mean_agr} | {b} | {c} | {p:.3f} | {ort_acc} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="fmnist_cnn,resnet_fmnist")
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the Markdown tables here (else print them)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    parts = []
    for model in args.models.split(","):
        if MODELS[model].task != "classify":
            raise SystemExit(f"{model}: draws compares classifiers (accuracy on labels); its task is {MODELS[model].task}")
        parts.append(table(model, collect(model, args.draws), args.draws))
    m = machine()
    head = ("# Calibration draws: the Fashion-MNIST classifiers, every tool, several calibration sets\n\n"
            f"Command: `bench/.venvs/prep/bin/python bench/draws.py {' '.join(sys.argv[1:])}` "
            f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {m.get('cpu', '')}, {m.get('cores', '')} cores; "
            f"CPU flags: {cpu_flags()}; onnxruntime {ort.__version__}; {time.perf_counter() - t0:.0f} s with cached jobs reused).\n\n")
    text = head + "\n".join(parts)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
