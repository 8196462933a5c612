"""Evaluate one INT8 model against its FP32 model on the evaluation set (runs in the ``ort`` venv).

The same evaluator, runtime (ONNX Runtime CPU, 2 threads) and samples for every tool. FP32 outputs are
computed once per model and cached under bench/.work/fp32_outputs/. Prints one JSON object; with
``--serve`` it answers one request per stdin line instead (a JSON object with the same keys as the
options), each answer one stdout line starting with ``RESULT``, keeping the last evaluation set and its
FP32 outputs in memory between requests (the driver starts it once per suite run).

Metrics by task:
- classify: top-1 agreement with FP32 (%), accuracy of FP32 and INT8 with labels (%), mean per-sample
  cosine of the output vectors; ``agree_bits`` (which samples' top-1 equals FP32's) and with labels
  ``correct_bits`` (which samples INT8 got right), packed bits in base64, for paired tests between models;
- dense (detector probability map): IoU of the maps thresholded at 0.3 (DBNet's default) between FP32 and
  INT8 (%), mean per-sample cosine, mean absolute error;
- embed: mean and minimum per-sample cosine of the embeddings;
- ctc (text-line recogniser, [N, T, classes] probabilities, class 0 = blank): greedy CTC decode; character
  error rate (edit distance / label characters, summed over samples) of FP32 and INT8 against the labels in
  ``eval_labels.json`` beside eval.npz (spaces ignored, as PaddleOCR's RecMetric does), reported as
  ``100 - CER`` (char accuracy, higher is better) and as CER; the share of samples whose INT8 decode equals the
  FP32 one, and the CER of the INT8 decode against the FP32 decode (spaces ignored there too).
``float_nodes``: Conv/ConvTranspose/Gemm/MatMul nodes whose first input is not produced by a
DequantizeLinear (compute left in float), out of ``weighted_nodes``. ``zero_points``: the zero-point
dtypes of the QuantizeLinear/DequantizeLinear nodes and whether every zero point is 0 (TensorRT takes
symmetric int8 with zero point 0 only).

``--optimization`` (default ``all``, ORT_ENABLE_ALL, what a user gets): ONNX Runtime's graph optimisation
for the INT8 model; ``disable`` (ORT_DISABLE_ALL) is the spec evaluation, Q/DQ computed as ONNX defines
them, unfused. The FP32 reference always runs with the default.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_npz  # noqa: E402

WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
OPTIMIZATION = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}


def session(path: str, optimization: str = "all") -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    so.graph_optimization_level = OPTIMIZATION[optimization]
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run_all(path: str, arrays: dict[str, np.ndarray], batch: int = 50, optimization: str = "all") -> np.ndarray:
    sess = session(path, optimization)
    out_name = sess.get_outputs()[0].name
    names = [i.name for i in sess.get_inputs()]
    n = len(next(iter(arrays.values())))
    outs = [sess.run([out_name], {k: arrays[k][i : i + batch] for k in names})[0] for i in range(0, n, batch)]
    return np.concatenate(outs).astype(np.float32)


def file_sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def fp32_outputs(model: str, eval_npz: str, arrays: dict, cache_dir: Path) -> np.ndarray:
    key = f"{Path(model).stem}-{file_sha(model)}-{file_sha(eval_npz)}"
    path = cache_dir / f"{key}.npy"
    if path.exists():
        return np.load(path, allow_pickle=False)
    out = run_all(model, arrays)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, out)
    tmp.replace(path)
    return out


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, num / np.where(den > 0, den, 1), np.where(np.abs(a).sum(1) + np.abs(b).sum(1) == 0, 1.0, 0.0))


def float_nodes(path: str) -> tuple[int, int]:
    g = onnx.load(path, load_external_data=False).graph
    producer = {o: n.op_type for n in g.node for o in n.output}
    weighted = [n for n in g.node if n.op_type in WEIGHTED]
    floats = [n for n in weighted if producer.get(n.input[0]) != "DequantizeLinear"]
    return len(floats), len(weighted)


def zero_points(path: str) -> dict:
    """Zero-point dtypes of the Q/DQ nodes and whether every zero point is 0 (a missing one is 0)."""
    from onnx import numpy_helper

    g = onnx.load(path, load_external_data=False).graph
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: a.t for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"}
    dtypes, all_zero = set(), True
    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(n.input) < 3 or not n.input[2]:
            continue
        t = inits.get(n.input[2]) or consts.get(n.input[2])
        if t is None:
            all_zero = False  # computed at run time: not provably 0
            continue
        arr = numpy_helper.to_array(t)
        dtypes.add(str(arr.dtype))
        all_zero = all_zero and not np.any(arr.astype(np.int64))
    return {"dtypes": sorted(dtypes), "all_zero": all_zero}


def ctc_decode(probs: np.ndarray, drop: tuple[int, ...] = (0,)) -> list[list[int]]:
    """Greedy CTC decode: argmax per step, collapse repeats, drop the blank (and the classes in ``drop``)."""
    out = []
    for a in probs.argmax(-1):
        keep = np.ones(len(a), bool)
        keep[1:] = a[1:] != a[:-1]
        out.append([int(c) for c in a[keep] if c not in drop])
    return out


def edit_distance(a: list, b: list) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def cer(pred: list[list[int]], truth: list[list[int]]) -> float:
    """Character error rate (%): summed edit distances over summed reference lengths."""
    return 100.0 * sum(edit_distance(p, t) for p, t in zip(pred, truth)) / max(1, sum(len(t) for t in truth))


def ctc_metrics(m: dict, ref: np.ndarray, got: np.ndarray, labels: dict | None) -> None:
    space = labels["space"] if labels else ref.shape[-1] - 1  # PP-OCR's CTCLabelDecode appends the space last
    a, b = ctc_decode(ref, (0, space)), ctc_decode(got, (0, space))
    m["decode_agreement"] = float(np.mean([x == y for x, y in zip(a, b)]) * 100)
    m["cer_vs_fp32"] = cer(b, a)
    if labels is None:
        m["primary"], m["primary_name"], m["primary_fp32"] = 100 - m["cer_vs_fp32"], "100 - CER vs FP32 decode %", 100.0
        return
    truth = [[c for c in t if c != space] for t in labels["ids"][: len(ref)]]
    m["cer_fp32"], m["cer_int8"] = cer(a, truth), cer(b, truth)
    m["primary"], m["primary_name"] = 100 - m["cer_int8"], "char accuracy % (100 - CER)"
    m["primary_fp32"] = 100 - m["cer_fp32"]


def metrics(task: str, ref: np.ndarray, got: np.ndarray, labels) -> dict:
    cos = cosine_rows(ref, got)
    m: dict = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
    if task == "classify":
        a, b = ref.reshape(len(ref), -1).argmax(1), got.reshape(len(got), -1).argmax(1)
        m["top1_agreement"] = float((a == b).mean() * 100)
        m["agree_bits"] = base64.b64encode(np.packbits(a == b).tobytes()).decode("ascii")  # per sample, for paired tests
        if labels is not None:
            m["accuracy_fp32"] = float((a == labels).mean() * 100)
            m["accuracy_int8"] = float((b == labels).mean() * 100)
            # per sample, for paired tests between two models on the same samples (calib_tables: McNemar)
            m["correct_bits"] = base64.b64encode(np.packbits(b == labels).tobytes()).decode("ascii")
            m["primary"], m["primary_name"] = m["accuracy_int8"], "accuracy %"
            m["primary_fp32"] = m["accuracy_fp32"]
        else:
            m["primary"], m["primary_name"], m["primary_fp32"] = m["top1_agreement"], "top-1 agreement %", 100.0
    elif task == "dense":
        pa, pb = ref > 0.3, got > 0.3
        union = np.logical_or(pa, pb).sum()
        m["map_iou"] = float(np.logical_and(pa, pb).sum() / union * 100) if union else 100.0
        m["mean_abs_error"] = float(np.abs(ref - got).mean())
        m["primary"], m["primary_name"], m["primary_fp32"] = m["map_iou"], "text-map IoU vs FP32 %", 100.0
    elif task == "ctc":
        ctc_metrics(m, ref, got, labels)
    else:
        m["primary"], m["primary_name"], m["primary_fp32"] = m["cosine_mean"] * 100, "embedding cosine x100", 100.0
    m["loss_points"] = m["primary_fp32"] - m["primary"]
    return m


def evaluate(fp32: str, int8: str, eval_npz: str, task: str, cache: Path, memo: dict | None = None,
             optimization: str = "all") -> dict:
    memo = {} if memo is None else memo
    key = (fp32, eval_npz)
    t0 = time.perf_counter()
    if key not in memo:
        memo.clear()
        arrays, labels = load_npz(eval_npz)
        sidecar = Path(eval_npz).parent / "eval_labels.json"  # sequence labels (ctc), eval_<k>.npz are prefixes
        if task == "ctc" and sidecar.exists():
            labels = json.loads(sidecar.read_text())
        memo[key] = (arrays, labels, fp32_outputs(fp32, eval_npz, arrays, cache))
    arrays, labels, ref = memo[key]
    t1 = time.perf_counter()
    got = run_all(int8, arrays, optimization=optimization)
    t2 = time.perf_counter()
    out = metrics(task, ref, got, labels)
    out["float_nodes"], out["weighted_nodes"] = float_nodes(int8)
    out["zero_points"], out["optimization"] = zero_points(int8), optimization
    out["eval_samples"] = len(ref)
    out["fp32_run_s"], out["int8_run_s"] = round(t1 - t0, 3), round(t2 - t1, 3)
    return out


def serve() -> None:
    memo: dict = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            out = evaluate(r["fp32"], r["int8"], r["eval"], r["task"], Path(r["cache"]), memo,
                           r.get("optimization", "all"))
        except Exception as e:  # answer every request: the driver records the error against the job
            out = {"error": f"{type(e).__name__}: {e}"[:600]}
        print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description="FP32 vs INT8 task metrics on the evaluation set")
    ap.add_argument("--serve", action="store_true", help="answer JSON requests from stdin, one per line")
    ap.add_argument("--fp32")
    ap.add_argument("--int8")
    ap.add_argument("--eval")
    ap.add_argument("--task", choices=["classify", "dense", "embed", "ctc"])
    ap.add_argument("--cache", type=Path)
    ap.add_argument("--optimization", choices=list(OPTIMIZATION), default="all",
                    help="ONNX Runtime graph optimisation for the INT8 model (disable = the spec evaluation)")
    args = ap.parse_args()
    if args.serve:
        serve()
        return
    missing = [k for k in ("fp32", "int8", "eval", "task", "cache") if getattr(args, k) is None]
    if missing:
        ap.error("missing " + ", ".join("--" + k for k in missing))
    print(json.dumps(evaluate(args.fp32, args.int8, args.eval, args.task, args.cache, optimization=args.optimization)))


if __name__ == "__main__":
    main()
