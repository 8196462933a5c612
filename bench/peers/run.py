"""Benchmarks against the peers: one command runs every tool on the same models and data.

    python bench/peers/run.py --suite quick|full [--models a,b] [--tools ort,calib,...]
    python bench/peers/run.py --suite quick --append --jobs default,target,ort,fp16,mem   # calib's N=128 jobs only

Each tool runs in its own venv (bench/.venvs/<tool>, created on demand from
bench/peers/requirements-<tool>.txt), each job as its own process, measured by ``procmon`` (wall time,
peak RSS of the process tree). Every INT8 model is then scored by the same evaluator (``tools/evaluate.py``
in the ``ort`` venv) on the same evaluation samples. Results go to ``bench/results/peers-<suite>.jsonl``
(one JSON object per job, with machine and command) and the tables in bench/README.md (and the summary in
the main README between ``<!-- peers:begin -->`` / ``<!-- peers:end -->``) are regenerated from that file.
The shared machinery (venvs, measuring, the evaluator) is ``harness.py``; calib's default, ``--target``,
runtime-target and memory-bound jobs at N = 128 are ``calib_jobs.py``. Failures are recorded with their error, never left out.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import MODELS, calib_path, model_path  # noqa: E402
from harness import (PEERS, REPO, RESULTS, RUNS, TOOLS_DIR, VENVS, Ctx, EvalServer, base, calib_cmd,  # noqa: E402,F401
                     calib_env, ensure_venv, eval_file, evaluate, machine, measure, venv_python)
import calib_jobs  # noqa: E402

VENV_TOOLS = ["prep", "ort", "modelopt", "nncf", "polygraphy", "calib"]
CALIB_METHODS = ["minmax", "percentile", "entropy", "mse"]
ADVISE_TARGET = "cosine:0.99"
SELECT_N = 100  # calibration samples (a prefix) that quantize --method best and advise choose on
BATCH = 20  # calibration batch size for every tool (tools/common.py): divides 100, 500 and 2000, because
# ONNX Runtime's histogram calibrators stack per-batch outputs and fail on a shorter last batch


@dataclass(frozen=True)
class Suite:
    name: str
    sizes: tuple[int, ...]  # calibration sizes for every method
    goal_sizes: tuple[int, ...]  # extra sizes for ORT entropy2048 and calib collect/calibrate (time + memory goals)
    compare_sizes: tuple[int | None, ...]  # evaluation-sample counts for the compare jobs (None = whole eval set)
    timeout_s: float
    advise_args: tuple[str, ...] = ()  # search budget of the advise job (calib advise options)
    compare_override: tuple[tuple[str, tuple[int | None, ...]], ...] = ()  # (model, compare sizes) pairs
    models: tuple[str, ...] = tuple(MODELS)
    goal_models: tuple[str, ...] = tuple(MODELS)  # models that get the goal_sizes runs
    eval_k: int | None = None  # evaluation samples for the task metrics (a prefix of eval.npz; None = all)


SUITES = {
    # quick: one calibration size, one compare size (20 samples; 5 on the detector, where Polygraphy alone
    # takes 66 s for 10 and needs 10.1 GB for 20), advise on a budget (rank on 16 samples, compare each
    # step's candidates on 16, no step after 30 s): under 15 minutes on 2 cores. (MiniLM on 10 samples
    # saved 24 s but fell to 7.4x against Polygraphy, whose fixed start-up then weighs more.)
    "quick": Suite("quick", sizes=(128,), goal_sizes=(500,), compare_sizes=(20,), timeout_s=600,
                   goal_models=("resnet_fmnist",), eval_k=200,
                   advise_args=("--sensitivity-samples", "16", "--candidate-samples", "16", "--time-budget", "30"),
                   compare_override=(("ppocr_det", (5,)),)),
    "full": Suite("full", sizes=(100, 500, 2000), goal_sizes=(), compare_sizes=(20, 100, None), timeout_s=1200,
                  advise_args=("--sensitivity-samples", "64", "--time-budget", "120")),
}
PEER_VARIANTS = {
    "ort": ["minmax", "entropy", "entropy2048", "percentile"],
    "modelopt": ["entropy", "max"],
    "nncf": ["default", "histogram"],
}



# ------------------------------------------------------------------ peers
def run_peer(ctx: Ctx, model: str, tool: str, variant: str, n: int) -> dict:
    rec = base(model, tool, variant, n)
    if tool in ctx.venv_errors:
        return ctx.record({**rec, "status": "failed", "error": ctx.venv_errors[tool]})
    d = RUNS / ctx.suite.name / model / f"{tool}-{variant}-{n}"
    d.mkdir(parents=True, exist_ok=True)
    # a private copy of the FP32 model: ModelOpt 0.47 writes its input file back in place (with shape
    # inference's value_info added: same outputs, other bytes), which no other tool should then read
    fp32 = d / "fp32_input.onnx"
    shutil.copyfile(model_path(model), fp32)
    argv = [str(venv_python(tool)), str(TOOLS_DIR / f"{tool}_job.py"), "--model", str(fp32),
            "--calib", str(calib_path(model, n)), "--out", str(d), "--method", variant]
    m, ok = measure(ctx, tool, argv, d)
    rec.update(m)
    if not ok:
        return ctx.record({**rec, "status": "failed"})
    rec.update(evaluate(ctx, model, d / "model.int8.onnx", d))
    return ctx.record({**rec, "status": "failed" if "eval_error" in rec else "ok",
                       **({"error": "evaluation: " + rec["eval_error"]} if "eval_error" in rec else {})})


# ------------------------------------------------------------------ calib (the CLI of issues 3, 4, 5, 7)

def run_calib(ctx: Ctx, model: str, n: int, full: bool) -> Path | None:
    """collect -> calibrate (all methods) -> export per method -> quantize --method best -> advise.
    Returns the entropy Q/DQ model (for the compare jobs) when it was made. The models are TensorRT-target
    (FP16 remainder): scored by the spec evaluation (what TensorRT computes), ONNX Runtime's default
    optimisation beside it (``metrics_optimized``: its WeightBiasQuantization breaks FP16 biases on
    effnet_lite, ``calib.export.ort_bias``), as ``calib_jobs`` scores its jobs."""
    fp32 = str(model_path(model))
    d = RUNS / ctx.suite.name / model / f"calib-{n}"
    d.mkdir(parents=True, exist_ok=True)

    def step(variant: str, args: list[str], int8: Path | None = None, needs_ok: bool = True,
             target: bool = False) -> bool:
        rec = base(model, "calib", variant, n)
        if "calib" in ctx.venv_errors:
            ctx.record({**rec, "status": "failed", "error": ctx.venv_errors["calib"]})
            return False
        if not needs_ok:
            ctx.record({**rec, "status": "failed", "error": "skipped: an earlier calib step failed"})
            return False
        log = d / variant.replace(":", "_")
        m, ok = measure(ctx, "calib", [calib_cmd(), *args], log, env=calib_env())
        rec.update(m)
        if target and int8 is not None and int8.exists() and (ok or m.get("returncode") == 1):
            # advise exits 1 when the target is not met (within its budget) and still writes its best model
            rec["target_met"] = ok
            if not ok:
                rec["target_error"] = rec.pop("error", "")
            ok = True
        if ok and int8 is not None:  # calib's TensorRT-target models: the spec evaluation first, as calib_jobs
            for opt in calib_jobs.TRT_EVALS:
                got = evaluate(ctx, model, int8, log, optimization=opt)
                if "eval_error" in got:
                    rec["eval_error"] = got["eval_error"]
                    break
                rec["metrics" if opt == calib_jobs.TRT_EVALS[0] else
                    f"metrics_{calib_jobs.EVAL_NAMES[opt]}"] = got["metrics"]
            rec["eval_optimization"] = calib_jobs.EVAL_NAMES[calib_jobs.TRT_EVALS[0]]
            if "eval_error" in rec:
                ok, rec["error"] = False, "evaluation: " + rec["eval_error"]
        ctx.record({**rec, "status": "ok" if ok else "failed"})
        return ok

    stats, ranges = d / "stats.npz", d / "ranges.json"
    ok = step("collect", ["collect", fp32, "--data", str(calib_path(model, n)), "-o", str(stats), "--batch-size", str(BATCH)])
    ok_cal = step("calibrate", ["calibrate", str(stats), "--method", "all", "-o", str(ranges)], needs_ok=ok)
    entropy_model = None
    if not full:
        return None
    for method in CALIB_METHODS:
        out = d / f"{method}.int8.onnx"
        if step(f"export:{method}", ["export", fp32, "--stats", str(stats), "--method", method, "-o", str(out)],
                int8=out, needs_ok=ok) and method == "entropy":
            entropy_model = out
    # best and advise choose on the calibration samples, at most the first SELECT_N of them (a prefix of
    # the calibration set, never the evaluation set): every greedy advise step re-runs its selection data
    select = str(calib_path(model, min(n, SELECT_N)))
    best = d / "best.int8.onnx"
    step("quantize:best", ["quantize", fp32, "--data", str(calib_path(model, n)), "--method", "best",
                           "--eval-data", select, "--batch-size", str(BATCH), "-o", str(best)], int8=best)
    adv = d / "advised.int8.onnx"
    adv.unlink(missing_ok=True)  # a model left by an earlier run must not pass for this one's
    step(f"advise:{ADVISE_TARGET}", ["advise", fp32, "--stats", str(stats), "--data", select,
                                     "--target", ADVISE_TARGET, "--batch-size", str(BATCH), "-o", str(adv),
                                     *ctx.suite.advise_args],
         int8=adv, needs_ok=ok, target=True)
    del ok_cal
    return entropy_model


# ------------------------------------------------------------------ compare: Polygraphy vs calib compare
def run_compare(ctx: Ctx, model: str, int8: Path, int8_from: str, k: int | None) -> None:
    n_eval = MODELS[model].n_eval
    k = n_eval if k is None else min(k, n_eval)
    data = eval_file(model, k)
    fp32 = str(model_path(model))
    d = RUNS / ctx.suite.name / model / f"compare-{k}"
    for tool, argv in [
        ("polygraphy", [str(venv_python("polygraphy")), str(TOOLS_DIR / "polygraphy_job.py"), "--fp32", fp32,
                        "--int8", str(int8), "--eval", str(data), "--out", str(d / "polygraphy")]),
        ("calib", [calib_cmd(), "compare", fp32, str(int8), "--data", str(data), "-o", str(d / "calib" / "compare.json"),
                   "--batch-size", str(BATCH)]),
    ]:
        rec = {**base(model, tool, "compare", k), "int8_compared": int8_from}
        if tool in ctx.venv_errors:
            ctx.record({**rec, "status": "failed", "error": ctx.venv_errors[tool]})
            continue
        (d / tool).mkdir(parents=True, exist_ok=True)
        m, ok = measure(ctx, tool, argv, d / tool, env=calib_env() if tool == "calib" else None)
        ctx.record({**rec, **m, "status": "ok" if ok else "failed"})


# ------------------------------------------------------------------ driver
def prepare_data(ctx: Ctx, models: list[str]) -> None:
    sizes = sorted(set(ctx.suite.sizes) | set(ctx.suite.goal_sizes) | {100, 500, 2000, calib_jobs.N})
    ks = sorted({k for k in ctx.suite.compare_sizes if k is not None} | ({ctx.suite.eval_k} - {None})
                | {k for _, sizes in ctx.suite.compare_override for k in sizes if k is not None})
    argv = [str(venv_python("prep")), str(PEERS / "prepare.py"), "--models", ",".join(models),
            "--sizes", ",".join(map(str, sizes)), "--eval-prefixes", ",".join(map(str, ks))]
    print("[prep] " + shlex.join(argv), flush=True)
    subprocess.run(argv, check=True, cwd=REPO)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=list(SUITES), default="quick")
    ap.add_argument("--models", default=None, help="comma-separated subset of: " + ", ".join(MODELS))
    ap.add_argument("--tools", default="ort,modelopt,nncf,calib,compare", help="subset of ort,modelopt,nncf,calib,compare")
    ap.add_argument("--mem-limit-mb", type=float, default=10240, help="kill a job whose process tree passes this RSS")
    ap.add_argument("--jobs", default=None, help="run only these jobs: peer jobs (e.g. ort:entropy2048@500,nncf:default@100), "
                    "calib's pipeline at N (calib@100) "
                    "and/or calib's N=128 jobs (" + ",".join(calib_jobs.JOBS) + ")")
    ap.add_argument("--compare-sizes", default=None, help="override the suite's compare sample counts, e.g. 20,100")
    ap.add_argument("--timeout-s", type=float, default=None, help="override the suite's per-job time limit (a "
                    "machine shared with other work; the record keeps wall and CPU time and the load)")
    ap.add_argument("--append", action="store_true", help="append to the results file instead of starting it anew")
    ap.add_argument("--table-only", action="store_true", help="only regenerate the tables from the results file")
    args = ap.parse_args(argv)
    suite = SUITES[args.suite]
    if args.compare_sizes:
        suite = replace(suite, compare_sizes=tuple(int(k) for k in args.compare_sizes.split(",")))
    if args.timeout_s:
        suite = replace(suite, timeout_s=args.timeout_s)
    out = RESULTS / f"peers-{suite.name}.jsonl"
    from table import update_readmes

    if args.table_only:
        update_readmes(out)
        return 0
    jobs = args.jobs.split(",") if args.jobs else []
    cjobs, pjobs = [j for j in jobs if j in calib_jobs.JOBS], [j for j in jobs if j not in calib_jobs.JOBS]
    bad = [j for j in pjobs if "@" not in j or (":" not in j and not j.startswith("calib@"))]
    if bad:
        print(f"--jobs {bad[0]}: expected tool:variant@N, calib@N or one of {','.join(calib_jobs.JOBS)}",
              file=sys.stderr)
        return 2
    models = args.models.split(",") if args.models else list(suite.models)
    tools = args.tools.split(",")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.append and out.exists():
        out.unlink()
    ctx = Ctx(suite, out, args.mem_limit_mb, machine(), "python bench/peers/run.py " + " ".join(argv or sys.argv[1:]))
    t0 = time.perf_counter()
    if jobs:
        tools = [j.split(":")[0].split("@")[0] for j in pjobs] + (["calib"] if cjobs else [])
    needed = ["prep", "ort"] + [t for t in ("modelopt", "nncf", "calib") if t in tools]
    if "compare" in tools:
        needed += ["polygraphy", "calib"]
    for tool in dict.fromkeys(needed):
        err = ensure_venv(tool, VENVS / f"{tool}.log")
        if err:
            ctx.venv_errors[tool] = err
            print(f"[venv] {err}", flush=True)
    if "prep" in ctx.venv_errors:
        print("cannot prepare data without the prep venv", file=sys.stderr)
        return 2
    prepare_data(ctx, models)
    if jobs:  # just these jobs, e.g. a re-run with a larger --mem-limit-mb, or calib's default/target paths
        for model in models:
            for job in pjobs:
                tool_variant, _, n = job.partition("@")
                tool, _, variant = tool_variant.partition(":")
                if tool_variant == "calib":  # calib's pipeline at N: collect, calibrate, the four exports, best, advise
                    run_calib(ctx, model, int(n), full=True)
                else:
                    run_peer(ctx, model, tool, variant, int(n))
            if cjobs:
                calib_jobs.run(ctx, model, cjobs)
            update_readmes(out)
        if ctx.evaluator is not None:
            ctx.evaluator.close()
        return 0
    for model in models:
        spec = MODELS[model]
        sizes = [n for n in suite.sizes if n <= spec.max_n]
        for n in sizes:
            for tool in ("ort", "modelopt", "nncf"):
                if tool in tools:
                    for variant in PEER_VARIANTS[tool]:
                        run_peer(ctx, model, tool, variant, n)
        goal_sizes = [n for n in suite.goal_sizes if n <= spec.max_n and n not in sizes and model in suite.goal_models]
        for n in goal_sizes:
            if "ort" in tools:
                run_peer(ctx, model, "ort", "entropy2048", n)
        entropy_model = None
        if "calib" not in tools:  # compare-only run: reuse the entropy model of an earlier calib run
            prev = RUNS / suite.name / model / f"calib-{sizes[0]}" / "entropy.int8.onnx"
            entropy_model = prev if prev.exists() else None
        if "calib" in tools:
            for n in sizes:
                m = run_calib(ctx, model, n, full=True)
                entropy_model = entropy_model or m
            for n in goal_sizes:
                run_calib(ctx, model, n, full=False)
            calib_jobs.run(ctx, model, calib_jobs.JOBS)  # default, --target, runtimes, memory bound at N=128
        if "compare" in tools:
            n0 = sizes[0]
            pair = (entropy_model, f"calib export entropy N={n0}") if entropy_model else (
                RUNS / suite.name / model / f"ort-minmax-{n0}" / "model.int8.onnx", f"ORT quantize_static MinMax N={n0}")
            if pair[0].exists():
                for k in dict(suite.compare_override).get(model, suite.compare_sizes):
                    run_compare(ctx, model, pair[0], pair[1], k)
            else:
                for tool in ("polygraphy", "calib"):
                    ctx.record({**base(model, tool, "compare", None), "status": "failed",
                                "error": "no INT8 model to compare (calib entropy export and ORT MinMax both failed)"})
        update_readmes(out)  # partial tables after each model
    if ctx.evaluator is not None:
        ctx.evaluator.close()
    print(f"suite {suite.name} finished in {time.perf_counter() - t0:.0f} s; results: {out}", flush=True)
    update_readmes(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
