"""Issue 17's structural checks of a TensorRT-target model with an FP16 remainder (runs in the ``ort`` venv).

For the model calib wrote (``--int8``), against the FP32 model it came from (``--fp32``), calib's scale report
(``--report``: its ``high_precision`` entry lists the nodes kept FP32 and why) and optionally the same model
with an FP32 remainder (``--fp32-remainder``) and the evaluation set (``--eval``, ``--task``):

- ``checker``: ``onnx.checker.check_model(full_check=True)`` passes ("ok") or its first line;
- ``ort_cpu``: the model loads and runs on ONNX Runtime's CPU provider with the default graph optimisation
  (ORT_ENABLE_ALL: what a user gets) on the first evaluation samples and gives the spec evaluation's outputs
  (ORT_DISABLE_ALL) within ``SPEC_TOL`` relative L2 error ("ok"), or what differs;
- ``io_kept``: the graph's inputs and outputs have the FP32 model's names and element types, in order
  (``io_diff`` lists what differs);
- ``fp32_compute``: nodes computing in FP32 (any float32 input or output after ONNX shape inference; Cast,
  QuantizeLinear and DequantizeLinear are not compute) that are not on calib's keep-FP32 list;
  ``undocumented``: listed nodes whose reason is none of the documented rules (calib/export/precision.py:
  the user's ``keep_fp32`` list, a tensor or initializer beyond the dtype's range in the statistics, a
  range op of the report's ``range_ops`` without statistics, an op with no kernel in the dtype at the opset);
- ``flips`` (task ``classify``, with ``--fp32-remainder`` and ``--eval``): the evaluation samples whose top-1
  class differs between the FP16- and the FP32-remainder model, each with both models' top-2 logit margin and
  the FP32 model's class, to tell a near-tie from a systematic loss (at most ``MAX_FLIPS`` listed).

Prints one JSON object. Independent of calib (onnx, onnxruntime and numpy only).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_npz  # noqa: E402

NOT_COMPUTE = {"Cast", "QuantizeLinear", "DequantizeLinear"}
RUN_SAMPLES = 8
MAX_FLIPS = 5
# inputs the ONNX spec types as float32 whatever the data's dtype (parameters, not the computation's precision)
FLOAT_PARAMS = {"Resize": (2,)}  # Resize-11+: scales is tensor(float)
SPEC_TOL = 0.05  # ORT fuses DQ -> op -> Q into integer kernels: its rounding differs from the spec by ~1e-3..1e-2
DOCUMENTED = (r"keep_fp32 \(user list\)$", r"tensor '.*' reaches \|x\| = \S+ in the statistics > \S+$",
              r"initializer '.*' holds \|x\| = \S+ > \S+$",
              r"(?P<op>\w+) can leave the low-precision range and no statistics show it fits$",
              r"\w+ has no (fp16|bf16) kernel in ONNX opset \d+$")


def io_signature(m: onnx.ModelProto) -> list[tuple[str, str, int]]:
    inits = {t.name for t in m.graph.initializer}
    ins = [("input", v.name, v.type.tensor_type.elem_type) for v in m.graph.input if v.name not in inits]
    return ins + [("output", v.name, v.type.tensor_type.elem_type) for v in m.graph.output]


def io_diff(fp32: onnx.ModelProto, got: onnx.ModelProto) -> list[str]:
    a, b = io_signature(fp32), io_signature(got)
    if a == b:
        return []
    name = onnx.TensorProto.DataType.Name
    return ([f"{k} {n}: {name(t)} in the FP32 model, missing or different" for k, n, t in a if (k, n, t) not in b]
            + [f"{k} {n}: {name(t)} not in the FP32 model" for k, n, t in b if (k, n, t) not in a]
            + (["same inputs/outputs in another order"] if sorted(a) == sorted(b) else []))


def float32_nodes(m: onnx.ModelProto) -> list[str]:
    """Names of the compute nodes with a float32 input or output (element types from ONNX shape inference)."""
    g = onnx.shape_inference.infer_shapes(m, strict_mode=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output) + list(g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    out = []
    for n in g.node:
        if n.op_type in NOT_COMPUTE:
            continue
        data = [t for k, t in enumerate(n.input) if k not in FLOAT_PARAMS.get(n.op_type, ())]
        if any(t and types.get(t) == onnx.TensorProto.FLOAT for t in data + list(n.output)):
            out.append(n.name)
    return out


def documented(reason: str, range_ops: list[str]) -> bool:
    for pat in DOCUMENTED:
        hit = re.match(pat, reason)
        if hit and ("op" not in hit.groupdict() or hit.group("op") in range_ops):
            return True
    return False


def session(path: str, level: ort.GraphOptimizationLevel, disabled: list[str] | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level, so.graph_optimization_level = 2, 3, level
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled or [])


def run(path: str, arrays: dict, level: ort.GraphOptimizationLevel, batch: int = 50,
        disabled: list[str] | None = None) -> np.ndarray:
    s = session(path, level, disabled)
    names, out = [i.name for i in s.get_inputs()], s.get_outputs()[0].name
    n = len(next(iter(arrays.values())))
    return np.concatenate([s.run([out], {k: arrays[k][i:i + batch] for k in names})[0]
                           for i in range(0, n, batch)]).astype(np.float64)


def ort_cpu(path: str, arrays: dict) -> str:
    """"ok" when ONNX Runtime's default optimisation runs the model and gives the spec evaluation's outputs
    (relative L2 error ≤ ``SPEC_TOL``), else what differs; names ORT's WeightBiasQuantization when disabling
    it alone restores the spec outputs (it computes b / (s_x s_w) in the bias's dtype: FP16 overflows)."""
    few = {k: v[:RUN_SAMPLES] for k, v in arrays.items()}
    try:
        got = run(path, few, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        spec = run(path, few, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    except Exception as e:  # any load or run failure is the finding
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if not np.all(np.isfinite(got)):
        return "non-finite outputs"
    err = rel_l2(got, spec)
    if err <= SPEC_TOL:
        return "ok"
    fixed = rel_l2(run(path, few, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, disabled=["WeightBiasQuantization"]), spec)
    why = " (ORT's WeightBiasQuantization: ok with it disabled, rel. error %.1e)" % fixed if fixed <= SPEC_TOL else ""
    return f"runs, but default optimisation differs from the spec evaluation: rel. L2 error {err:.3g}{why}"


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def margins(o: np.ndarray) -> np.ndarray:
    s = np.sort(o, axis=1)
    return s[:, -1] - s[:, -2]


def flips(fp32: str, fp16: str, fp32_rem: str, arrays: dict) -> dict:
    """Samples whose top-1 differs between the FP16- and FP32-remainder models, with their logit margins."""
    spec = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = run(fp32, arrays, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    a, b = (run(p, arrays, spec) for p in (fp16, fp32_rem))
    a, b, ref = (x.reshape(len(x), -1) for x in (a, b, ref))
    idx = np.nonzero(a.argmax(1) != b.argmax(1))[0]
    ma, mb = margins(a), margins(b)
    rows = [{"sample": int(i), "fp32_class": int(ref[i].argmax()), "fp16_class": int(a[i].argmax()),
             "fp32_rem_class": int(b[i].argmax()), "fp16_margin": round(float(ma[i]), 5),
             "fp32_rem_margin": round(float(mb[i]), 5)} for i in idx[:MAX_FLIPS]]
    return {"n": int(len(idx)), "of": int(len(a)), "samples": rows,
            "median_margin": round(float(np.median(mb)), 5),
            "fp16_agrees_fp32": int((a.argmax(1) == ref.argmax(1)).sum()),
            "fp32_rem_agrees_fp32": int((b.argmax(1) == ref.argmax(1)).sum())}


def check(fp32: str, int8: str, report: str | None, fp32_rem: str | None = None, eval_npz: str | None = None,
          task: str | None = None) -> dict:
    m32, m = onnx.load(fp32, load_external_data=False), onnx.load(int8)
    out: dict = {}
    try:
        onnx.checker.check_model(m, full_check=True)
        out["checker"] = "ok"
    except Exception as e:  # the checker's message is the finding
        out["checker"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    diff = io_diff(m32, m)
    out["io_kept"], out["io_diff"] = not diff, diff
    hp = {}
    if report and Path(report).exists():
        hp = json.loads(Path(report).read_text()).get("high_precision") or {}
    kept = hp.get("nodes", {})
    out["kept_fp32"] = len(kept)
    out["fp32_compute"] = [n for n in float32_nodes(m) if n not in kept]
    out["undocumented"] = {n: r for n, r in kept.items() if not documented(r, hp.get("range_ops", []))}
    out["keep_list_source"] = "report" if hp else "none (no high_precision entry in the report)"
    arrays = load_npz(eval_npz)[0] if eval_npz else None
    out["ort_cpu"] = ort_cpu(int8, arrays) if arrays is not None else "not run (no --eval)"
    if task == "classify" and fp32_rem and arrays is not None and out["ort_cpu"] == "ok":
        out["flips"] = flips(fp32, int8, fp32_rem, arrays)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="checker / I/O / FP32-compute checks of an FP16-remainder model")
    ap.add_argument("--fp32", required=True, help="the FP32 model calib read")
    ap.add_argument("--int8", required=True, help="the model calib wrote (FP16 remainder)")
    ap.add_argument("--report", help="calib's scale report (--report) of that model")
    ap.add_argument("--fp32-remainder", help="the same model written with --high-precision fp32")
    ap.add_argument("--eval", help="evaluation samples (.npz)")
    ap.add_argument("--task", choices=["classify", "dense", "embed", "ctc"])
    a = ap.parse_args()
    print(json.dumps(check(a.fp32, a.int8, a.report, a.fp32_remainder, a.eval, a.task)))


if __name__ == "__main__":
    main()
