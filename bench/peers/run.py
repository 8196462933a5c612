"""Benchmarks against the peers: one command runs every tool on the same models and data.

    python bench/peers/run.py --suite quick|full [--models a,b] [--tools ort,calib,...]

Each tool runs in its own venv (bench/.venvs/<tool>, created on demand from
bench/peers/requirements-<tool>.txt), each job as its own process, measured by ``procmon`` (wall time,
peak RSS of the process tree). Every INT8 model is then scored by the same evaluator (``tools/evaluate.py``
in the ``ort`` venv) on the same evaluation samples. Results go to ``bench/results/peers-<suite>.jsonl``
(one JSON object per job, with machine and command) and the tables in bench/README.md (and the summary in
the main README between ``<!-- peers:begin -->`` / ``<!-- peers:end -->``) are regenerated from that file.
Failures are recorded with their error, never left out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import BENCH, DATA_DIR, MODELS, WORK, calib_path, eval_path, model_path  # noqa: E402
from procmon import run_measured  # noqa: E402

REPO = BENCH.parent
PEERS = BENCH / "peers"
TOOLS_DIR = PEERS / "tools"
VENVS = BENCH / ".venvs"
RESULTS = BENCH / "results"
RUNS = WORK / "runs"
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
    "quick": Suite("quick", sizes=(100,), goal_sizes=(500,), compare_sizes=(20,), timeout_s=600,
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


# ------------------------------------------------------------------ venvs
def venv_python(tool: str) -> Path:
    return VENVS / tool / "bin" / "python"


def ensure_venv(tool: str, log: Path) -> str | None:
    """Create bench/.venvs/<tool> from its requirements file once; return an error string on failure."""
    req = PEERS / f"requirements-{tool}.txt"
    stamp = VENVS / tool / ".requirements"
    if stamp.exists() and stamp.read_text() == req.read_text() and venv_python(tool).exists():
        return None
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[venv] creating bench/.venvs/{tool} from {req.name} (log: {log})", flush=True)
    with open(log, "ab") as f:
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(VENVS / tool)],
            [str(venv_python(tool)), "-m", "pip", "install", "--upgrade", "pip"],
            [str(venv_python(tool)), "-m", "pip", "install", "-r", str(req)],
        ]
        for argv in steps:
            r = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
            if r.returncode != 0:
                tail = log.read_text(errors="replace").strip().splitlines()[-5:]
                return f"venv {tool}: `{shlex.join(argv)}` failed ({r.returncode}): " + " | ".join(tail)
    stamp.write_text(req.read_text())
    return None


# ------------------------------------------------------------------ machine and records
def machine() -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem, 1), "os": platform.platform()}


@dataclass
class Ctx:
    suite: Suite
    out: Path
    mem_limit_mb: float
    machine: dict
    command: str
    venv_errors: dict[str, str] = field(default_factory=dict)
    evaluator: "EvalServer | None" = None

    def record(self, rec: dict) -> dict:
        rec = {"suite": self.suite.name, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **rec,
               "machine": self.machine, "command": self.command}
        with open(self.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        status = rec["status"] if rec["status"] == "ok" else "FAILED: " + rec.get("error", "")[:160]
        metric = rec.get("metrics", {}).get("primary")
        extra = f" metric={metric:.2f}" if isinstance(metric, float) else ""
        print(f"[{rec['model']}] {rec['tool']}:{rec['variant']} N={rec.get('n')} "
              f"{rec.get('wall_s', 0):.1f}s {rec.get('peak_rss_mb', 0):.0f}MB{extra} {status}", flush=True)
        return rec


def error_of(run, log_dir: Path) -> str:
    if run.killed_reason:
        return run.killed_reason
    lines = [ln for ln in run.stderr_tail.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):  # the last line that reads like an error
        if any(k in ln for k in ("Error", "error", "failed", "Exception", "No such", "not ")):
            return ln.strip()[:600]
    return (lines[-1].strip()[:600] if lines else f"exit code {run.returncode}") + f" (log: {log_dir})"


def measure(ctx: Ctx, tool: str, argv: list[str], log_dir: Path, env: dict | None = None) -> tuple[dict, bool]:
    """Run one measured job; return the timing part of its record and whether it succeeded."""
    load = os.getloadavg()[0]
    run = run_measured(argv, log_dir=log_dir, env=env, cwd=REPO, timeout_s=ctx.suite.timeout_s,
                       mem_limit_mb=ctx.mem_limit_mb)
    rec = {"wall_s": round(run.wall_s, 3), "cpu_s": round(run.cpu_s, 3), "peak_rss_mb": round(run.peak_rss_mb, 1),
           "max_single_rss_mb": None if run.max_single_rss_mb != run.max_single_rss_mb else round(run.max_single_rss_mb, 1),
           "loadavg_1m_before": round(load, 2), "argv": [str(a).replace(str(REPO) + "/", "") for a in argv]}
    ok = run.returncode == 0 and run.killed_reason is None
    rec["returncode"] = run.returncode
    if not ok:
        rec["error"] = error_of(run, log_dir)
    result = log_dir / "result.json"
    if ok and result.exists():
        rec["job"] = json.loads(result.read_text())
    return rec, ok


def eval_file(model: str, k: int | None) -> Path:
    """The first ``k`` evaluation samples (written by prepare.py), or the whole set."""
    if k is None or k >= MODELS[model].n_eval:
        return eval_path(model)
    return DATA_DIR / model / f"eval_{k}.npz"


class EvalServer:
    """``tools/evaluate.py --serve`` in the ort venv, started once: it keeps the evaluation set and FP32
    outputs in memory, so scoring an INT8 model costs only its own run (unmeasured: not part of any job)."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([str(venv_python("ort")), str(TOOLS_DIR / "evaluate.py"), "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log, "ab"),
                                     text=True, cwd=REPO)

    def request(self, req: dict) -> dict:
        for _ in range(2):  # restart once if it died (e.g. killed for memory)
            if self.proc is None or self.proc.poll() is not None:
                self.start()
            try:
                self.proc.stdin.write(json.dumps(req) + "\n")
                self.proc.stdin.flush()
                for line in self.proc.stdout:
                    if line.startswith("RESULT "):
                        return json.loads(line[7:])
            except (BrokenPipeError, OSError):
                pass
            self.proc = None
        return {"error": f"the evaluator exited (log: {self.log})"}

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def evaluate(ctx: Ctx, model: str, int8: Path, log_dir: Path) -> dict:
    """Task metrics of an INT8 model (the unmeasured evaluator, in the ort venv)."""
    if "ort" in ctx.venv_errors:
        return {"eval_error": ctx.venv_errors["ort"]}
    if ctx.evaluator is None:
        ctx.evaluator = EvalServer(VENVS / "evaluate.log")
    out = ctx.evaluator.request({"fp32": str(model_path(model)), "int8": str(int8),
                                 "eval": str(eval_file(model, None if MODELS[model].eval_all else ctx.suite.eval_k)),
                                 "task": MODELS[model].task,
                                 "cache": str(WORK / "fp32_outputs")})
    (log_dir / "evaluate.txt").write_text(json.dumps(out) + "\n")
    if "error" in out:
        return {"eval_error": out["error"]}
    return {"metrics": out}


def base(model: str, tool: str, variant: str, n: int | None) -> dict:
    return {"model": model, "tool": tool, "variant": variant, "n": n}


# ------------------------------------------------------------------ peers
def run_peer(ctx: Ctx, model: str, tool: str, variant: str, n: int) -> dict:
    rec = base(model, tool, variant, n)
    if tool in ctx.venv_errors:
        return ctx.record({**rec, "status": "failed", "error": ctx.venv_errors[tool]})
    d = RUNS / ctx.suite.name / model / f"{tool}-{variant}-{n}"
    d.mkdir(parents=True, exist_ok=True)
    argv = [str(venv_python(tool)), str(TOOLS_DIR / f"{tool}_job.py"), "--model", str(model_path(model)),
            "--calib", str(calib_path(model, n)), "--out", str(d), "--method", variant]
    m, ok = measure(ctx, tool, argv, d)
    rec.update(m)
    if not ok:
        return ctx.record({**rec, "status": "failed"})
    rec.update(evaluate(ctx, model, d / "model.int8.onnx", d))
    return ctx.record({**rec, "status": "failed" if "eval_error" in rec else "ok",
                       **({"error": "evaluation: " + rec["eval_error"]} if "eval_error" in rec else {})})


# ------------------------------------------------------------------ calib (the CLI of issues 3, 4, 5, 7)
def calib_cmd() -> str:
    return str(VENVS / "calib" / "bin" / "calib")


def run_calib(ctx: Ctx, model: str, n: int, full: bool) -> Path | None:
    """collect -> calibrate (all methods) -> export per method -> quantize --method best -> advise.
    Returns the entropy Q/DQ model (for the compare jobs) when it was made."""
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
        m, ok = measure(ctx, "calib", [calib_cmd(), *args], log)
        rec.update(m)
        if target and int8 is not None and int8.exists() and (ok or m.get("returncode") == 1):
            # advise exits 1 when the target is not met (within its budget) and still writes its best model
            rec["target_met"] = ok
            if not ok:
                rec["target_error"] = rec.pop("error", "")
            ok = True
        if ok and int8 is not None:
            rec.update(evaluate(ctx, model, int8, log))
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
        m, ok = measure(ctx, tool, argv, d / tool)
        ctx.record({**rec, **m, "status": "ok" if ok else "failed"})


# ------------------------------------------------------------------ driver
def prepare_data(ctx: Ctx, models: list[str]) -> None:
    sizes = sorted(set(ctx.suite.sizes) | set(ctx.suite.goal_sizes) | {100, 500, 2000})
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
    ap.add_argument("--jobs", default=None, help="run only these peer jobs, e.g. ort:entropy2048@500,nncf:default@100")
    ap.add_argument("--compare-sizes", default=None, help="override the suite's compare sample counts, e.g. 20,100")
    ap.add_argument("--append", action="store_true", help="append to the results file instead of starting it anew")
    ap.add_argument("--table-only", action="store_true", help="only regenerate the tables from the results file")
    args = ap.parse_args(argv)
    suite = SUITES[args.suite]
    if args.compare_sizes:
        suite = replace(suite, compare_sizes=tuple(int(k) for k in args.compare_sizes.split(",")))
    out = RESULTS / f"peers-{suite.name}.jsonl"
    from table import update_readmes

    if args.table_only:
        update_readmes(out)
        return 0
    models = args.models.split(",") if args.models else list(suite.models)
    tools = args.tools.split(",")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.append and out.exists():
        out.unlink()
    ctx = Ctx(suite, out, args.mem_limit_mb, machine(), "python bench/peers/run.py " + " ".join(argv or sys.argv[1:]))
    t0 = time.perf_counter()
    if args.jobs:
        tools = [j.split(":")[0] for j in args.jobs.split(",")]
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
    if args.jobs:  # just these peer jobs, e.g. a re-run with a larger --mem-limit-mb
        for model in models:
            for job in args.jobs.split(","):
                tool_variant, _, n = job.partition("@")
                tool, _, variant = tool_variant.partition(":")
                run_peer(ctx, model, tool, variant, int(n))
        update_readmes(out)
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
