"""calib's own paths on the peers suite's models, each a measured job at N = 128 calibration samples.

Selectable with ``run.py --jobs default,methods,target,ort,fp16,mem`` (any subset); a whole suite run includes them.
Every model is scored on the suite's evaluation samples (``eval.npz`` or its prefix), which no job sees:
calib chooses on its own ~25 % selection split of the 128 calibration samples. The default, methods and
target jobs write TensorRT-target models (FP16 remainder) and are scored by the spec evaluation (what TensorRT
computes), and under ONNX Runtime's default optimisation beside it (``metrics_optimized``).

- ``default``: ``calib quantize MODEL --data calib_128.npz -o OUT`` and no other option (issue 15): wall
  time, peak RSS, held-out metric, and the transforms the default path applied (from its output).
- ``methods``: ``calib quantize MODEL --data calib_128.npz -o OUT --method X`` for each single method X of
  ``METHODS`` (minmax, percentile, entropy, mse): the default path's "best single method" at the same N and
  code (the suite's ``export:X`` jobs run at other sizes and on whatever code ran them).
- ``target``: the same with ``--target cosine:0.99`` and no ``--eval-data``; a 6-minute limit (goal: 5 min,
  < 4 GB). Exit 1 = target not met, the best model is still written and scored.
- ``ort``: ``--target-runtime ort``; the model is scored twice: ONNX Runtime's default graph optimisation
  (ORT_ENABLE_ALL, only the real outputs: what a user gets) and the spec evaluation (ORT_DISABLE_ALL: Q/DQ
  computed as ONNX defines them) (issue 16: gap ≤ 0.5 points).
- ``fp16``: ``--target-runtime trt --high-precision fp32`` and ``... fp16``, both scored by the spec
  evaluation on the model's whole evaluation set (issue 17: gap ≤ 0.2 points, finer than one sample of the
  suite's 200-sample prefix), and the FP16 model checked by ``tools/fp16_check.py`` (onnx.checker full check,
  ONNX Runtime CPU with default optimisation, graph I/O names and dtypes, FP32 compute nodes outside calib's
  keep-FP32 list; on classifiers the samples whose top-1 differs between the two remainders, with margins).
- ``mem``: ``calib collect --max-memory X`` with X from calib's own memory model (``tools/calib_groups.py``:
  at least calib's minimum, below one pass so that it groups; 1 GiB where that lies in between; the minimum,
  marked n/a, where one pass already fits under it), beside the same collect with ``--max-memory none``
  (issue 20).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Callable

from harness import (RUNS, TOOLS_DIR, Ctx, base, calib_cmd, calib_env, eval_set, evaluate,  # noqa: E402
                     measure, venv_python)
from models import MODELS, calib_path, model_path  # noqa: E402

N = 128
JOBS = ("default", "methods", "target", "ort", "fp16", "mem")
METHODS = ("minmax", "percentile", "entropy", "mse")
TARGET = "cosine:0.99"
TARGET_TIMEOUT_S = 360.0
MEM_PREFER = 1 << 30
EVAL_NAMES = {None: "optimized", "disable": "spec"}
# The default, methods and target jobs write TensorRT-target models (FP16 remainder): scored first by the spec
# evaluation (Q/DQ as ONNX defines them: what TensorRT computes), then under ONNX Runtime's default
# optimisation, recorded as ``metrics_optimized`` (ORT's WeightBiasQuantization can break FP16 biases).
TRT_EVALS = ("disable", None)  # evaluator optimisation level -> record key suffix


def stdout_facts(log: Path) -> dict:
    """What calib printed about the model it wrote: ``path:`` (method + transforms + float nodes) and the
    ``shipped model:`` figures (calib's own, on its report split)."""
    try:
        lines = (log / "stdout.txt").read_text(errors="replace").splitlines()
    except OSError:
        return {}
    out = {}
    for ln in lines:
        ln = ln.strip()
        for key, prefix in (("path", "path: "), ("calib_says", "shipped model: "), ("advise_says", "advise: ")):
            if ln.startswith(prefix):
                out[key] = ln[len(prefix):]
    return out


TRANSFORM_KEYS = ("name", "kept", "metric", "selection_delta", "held_out_delta", "held_out_in_sample", "why")


def transforms_of(out_dir: Path, facts: dict) -> list | None:
    """The transforms the default path tried, read tolerantly: the ``transforms`` list of the scale report
    (``--report``) or any JSON calib wrote beside the model (``[{"name", "kept", "held_out_delta", ...}]``,
    node lists replaced by their count), else the names in its ``path:`` line."""
    for p in sorted(out_dir.glob("*.json")):
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        for d in (doc, doc.get("metrics", {}) if isinstance(doc, dict) else {}):
            if isinstance(d, dict) and isinstance(d.get("transforms"), list):
                return [{**{k: t[k] for k in TRANSFORM_KEYS if k in t},
                         **({"nodes": len(t["nodes"])} if isinstance(t.get("nodes"), list) else {})}
                        if isinstance(t, dict) else t for t in d["transforms"]]
    path = facts.get("path")
    if path is None:
        return None
    parts = [p.strip() for p in path.split(" + ")[1:] if not p.strip().startswith("advise")]
    return [{"name": p.replace(" (not kept)", ""), "kept": not p.endswith("(not kept)")} for p in parts]


def quantize_job(ctx: Ctx, model: str, variant: str, args: list[str], *, evals: tuple[str | None, ...] = (None,),
                 target: bool = False, timeout_s: float | None = None, whole: bool = False,
                 check: Callable[[Path], dict] | None = None) -> dict:
    """One measured ``calib quantize`` (with its scale report, ``scales.json``) and its model scored once per
    ``evals`` entry (None: ORT's default optimisation; "disable": the spec evaluation), on the whole evaluation
    set with ``whole``. ``target``: exit 1 still wrote a model (target not met). ``check(dir)``: more facts
    about the written model, recorded under ``check``."""
    rec = base(model, "calib", variant, N)
    if "calib" in ctx.venv_errors:
        return ctx.record({**rec, "status": "failed", "error": ctx.venv_errors["calib"]})
    d = RUNS / ctx.suite.name / model / f"calib-{N}-{variant.replace(':', '-')}"
    d.mkdir(parents=True, exist_ok=True)
    out = d / "model.int8.onnx"
    for old in [out, *d.glob("*.json")]:  # a file left by an earlier run must not pass for this one's
        old.unlink(missing_ok=True)
    argv = [calib_cmd(), "quantize", str(model_path(model)), "--data", str(calib_path(model, N)), "-o", str(out),
            "--report", str(d / "scales.json"), *args]
    m, ok = measure(ctx, "calib", argv, d / "log", env=calib_env(), timeout_s=timeout_s)
    rec.update(m)
    facts = stdout_facts(d / "log")
    rec.update(facts)
    if target and out.exists() and (ok or m.get("returncode") == 1):
        rec["target_met"] = ok
        if not ok:
            rec["target_error"] = rec.pop("error", "")
        ok = True
    if ok and not out.exists():
        ok, rec["error"] = False, f"calib exited 0 but wrote no model at {out}"
    if not ok:
        return ctx.record({**rec, "status": "failed"})
    for opt in evals:
        got = evaluate(ctx, model, out, d / "log", optimization=opt, whole=whole)
        if "eval_error" in got:
            return ctx.record({**rec, "status": "failed", "error": f"evaluation ({opt or 'default'}): {got['eval_error']}"})
        rec["metrics" if opt == evals[0] else f"metrics_{EVAL_NAMES[opt]}"] = got["metrics"]
    rec["transforms"] = transforms_of(d, facts)
    rec["eval_optimization"] = EVAL_NAMES[evals[0]]
    if check is not None:
        rec["check"] = check(d)
    return ctx.record({**rec, "status": "ok"})


def fp16_check(ctx: Ctx, model: str, fp32_rem: Path) -> Callable[[Path], dict]:
    """``tools/fp16_check.py`` (ort venv, unmeasured) on the FP16 model in a job's directory, beside the FP32
    model, its scale report and the FP32-remainder model at ``fp32_rem``."""
    def run_check(d: Path) -> dict:
        argv = [str(venv_python("ort")), str(TOOLS_DIR / "fp16_check.py"), "--fp32", str(model_path(model)),
                "--int8", str(d / "model.int8.onnx"), "--report", str(d / "scales.json"),
                "--eval", str(eval_set(ctx, model, whole=True)), "--task", MODELS[model].task]
        if fp32_rem.exists():
            argv += ["--fp32-remainder", str(fp32_rem)]
        r = subprocess.run(argv, capture_output=True, text=True)
        (d / "log" / "fp16_check.txt").write_text(r.stdout + r.stderr)
        if r.returncode != 0 or not r.stdout.strip():
            return {"error": (r.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        return json.loads(r.stdout.strip().splitlines()[-1])
    return run_check


def collect_job(ctx: Ctx, model: str, variant: str, bound: str, plan: dict | None = None) -> dict:
    rec = {**base(model, "calib", variant, N), "max_memory": bound, **({"plan": plan} if plan else {})}
    d = RUNS / ctx.suite.name / model / f"calib-{N}-{variant.replace(':', '-')}"
    d.mkdir(parents=True, exist_ok=True)
    argv = [calib_cmd(), "collect", str(model_path(model)), "--data", str(calib_path(model, N)),
            "--max-memory", bound, "-o", str(d / "stats.npz")]
    m, ok = measure(ctx, "calib", argv, d / "log", env=calib_env())
    rec.update(m)
    try:
        said = re.findall(r"max_memory \d+ MiB: (\d+) tensor group", (d / "log" / "stderr.txt").read_text(errors="replace"))
    except OSError:
        said = []
    rec["groups"] = int(said[-1]) if said else 1
    return ctx.record({**rec, "status": "ok" if ok else "failed"})


def memory_jobs(ctx: Ctx, model: str) -> None:
    """The bounded collect (a bound that forces grouping) and the unbounded one beside it."""
    argv = [str(venv_python("calib")), str(TOOLS_DIR / "calib_groups.py"), "--model", str(model_path(model)),
            "--data", str(calib_path(model, N)), "--prefer", str(MEM_PREFER)]
    r = subprocess.run(argv, capture_output=True, text=True, env=calib_env())
    if r.returncode != 0:
        err = (r.stderr.strip().splitlines() or ["no output"])[-1]
        ctx.record({**base(model, "calib", "collect:max-memory", N), "status": "failed",
                    "error": f"planning the bound (tools/calib_groups.py): {err}"})
    else:
        plan = json.loads(r.stdout.strip().splitlines()[-1])
        collect_job(ctx, model, "collect:max-memory", str(plan["bound_bytes"]), plan)
    collect_job(ctx, model, "collect:unbounded", "none")


def run(ctx: Ctx, model: str, jobs) -> None:
    """The selected jobs on one model, in the order of ``JOBS``."""
    if "calib" in ctx.venv_errors or not calib_path(model, N).exists():
        err = ctx.venv_errors.get("calib") or f"no {calib_path(model, N).name} (prepare.py)"
        for j in (j for j in JOBS if j in jobs):
            ctx.record({**base(model, "calib", f"job:{j}", N), "status": "failed", "error": err})
        return
    if "default" in jobs:
        quantize_job(ctx, model, "quantize:default", [], evals=TRT_EVALS)
    if "methods" in jobs:
        for m in METHODS:
            quantize_job(ctx, model, f"quantize:method:{m}", ["--method", m], evals=TRT_EVALS)
    if "target" in jobs:
        quantize_job(ctx, model, f"quantize:target:{TARGET}", ["--target", TARGET], target=True,
                     timeout_s=TARGET_TIMEOUT_S, evals=TRT_EVALS)
    if "ort" in jobs:
        quantize_job(ctx, model, "quantize:ort", ["--target-runtime", "ort"], evals=(None, "disable"))
    if "fp16" in jobs:  # the FP32 remainder first: the FP16 model's check compares the two
        trt = ["--target-runtime", "trt", "--high-precision"]
        r32 = quantize_job(ctx, model, "quantize:trt-fp32", [*trt, "fp32"], evals=("disable",), whole=True)
        rem = RUNS / ctx.suite.name / model / f"calib-{N}-quantize-trt-fp32" / "model.int8.onnx"
        quantize_job(ctx, model, "quantize:trt-fp16", [*trt, "fp16"], evals=("disable",), whole=True,
                     check=fp16_check(ctx, model, rem if r32["status"] == "ok" else Path("/nonexistent")))
    if "mem" in jobs:
        memory_jobs(ctx, model)
