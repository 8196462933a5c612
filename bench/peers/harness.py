"""What every peers job shares: the venvs, the machine record, one measured job (``procmon``), the
unmeasured evaluator (``tools/evaluate.py --serve`` in the ``ort`` venv) and the results file.

Imported by ``run.py`` (the driver) and ``calib_jobs.py`` (calib's default / ``--target`` / runtime jobs).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import BENCH, DATA_DIR, MODELS, WORK, eval_path, model_path  # noqa: E402
from procmon import run_measured  # noqa: E402

REPO = BENCH.parent
PEERS = BENCH / "peers"
TOOLS_DIR = PEERS / "tools"
VENVS = BENCH / ".venvs"
RESULTS = BENCH / "results"
RUNS = WORK / "runs"

# ------------------------------------------------------------------ venvs
def venv_python(tool: str) -> Path:
    return VENVS / tool / "bin" / "python"


def pins(text: str) -> set[str]:
    """The requirement lines of a requirements file (comments and blank lines left out)."""
    return {ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")}


def ensure_venv(tool: str, log: Path) -> str | None:
    """Create bench/.venvs/<tool> from its requirements file once; return an error string on failure."""
    req = PEERS / f"requirements-{tool}.txt"
    stamp = VENVS / tool / ".requirements"
    # bench/.venvs may be shared by several checkouts: a venv built from a superset of these pins serves too
    # (re-creating it with --clear would pull it from under another checkout's running jobs)
    if stamp.exists() and venv_python(tool).exists() and pins(req.read_text()) <= pins(stamp.read_text()):
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


def commit() -> str:
    """The checked-out commit the jobs measure (``+dirty`` when tracked files differ from it)."""
    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""
    head = git("rev-parse", "--short=9", "HEAD") or "?"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


@dataclass
class Ctx:
    suite: Any  # run.Suite: name, timeout_s, eval_k
    out: Path
    mem_limit_mb: float
    machine: dict
    command: str
    venv_errors: dict[str, str] = field(default_factory=dict)
    evaluator: "EvalServer | None" = None
    commit: str = field(default_factory=commit)

    def record(self, rec: dict) -> dict:
        rec = {"suite": self.suite.name, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **rec,
               "machine": self.machine, "command": self.command, "commit": self.commit}
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


def measure(ctx: Ctx, tool: str, argv: list[str], log_dir: Path, env: dict | None = None,
            timeout_s: float | None = None) -> tuple[dict, bool]:
    """Run one measured job (``timeout_s``: this job's limit instead of the suite's); return the timing part
    of its record and whether it succeeded."""
    load = os.getloadavg()[0]
    run = run_measured(argv, log_dir=log_dir, env=env, cwd=REPO, timeout_s=timeout_s or ctx.suite.timeout_s,
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


def eval_set(ctx: Ctx, model: str, whole: bool = False) -> Path:
    """The evaluation file a job scores on: the suite's prefix, or the whole set (some models always)."""
    return eval_file(model, None if whole or MODELS[model].eval_all else ctx.suite.eval_k)


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


def evaluate(ctx: Ctx, model: str, int8: Path, log_dir: Path, optimization: str | None = None,
             whole: bool = False) -> dict:
    """Task metrics of an INT8 model (the unmeasured evaluator, in the ort venv). ``optimization``: ONNX
    Runtime's graph optimisation for the INT8 model (``tools/evaluate.py --optimization``; None = its
    default, ORT_ENABLE_ALL, as for every peer); ``disable`` is the spec evaluation (Q/DQ as ONNX defines).
    ``whole``: the model's whole evaluation set, whatever the suite's prefix (``eval_set``)."""
    if "ort" in ctx.venv_errors:
        return {"eval_error": ctx.venv_errors["ort"]}
    if ctx.evaluator is None:
        ctx.evaluator = EvalServer(VENVS / "evaluate.log")
    req = {"fp32": str(model_path(model)), "int8": str(int8), "eval": str(eval_set(ctx, model, whole)),
           "task": MODELS[model].task, "cache": str(WORK / "fp32_outputs")}
    out = ctx.evaluator.request({**req, "optimization": optimization} if optimization else req)
    name = f"evaluate-{optimization}.txt" if optimization else "evaluate.txt"
    (log_dir / name).write_text(json.dumps(out) + "\n")
    if "error" in out:
        return {"eval_error": out["error"]}
    return {"metrics": out}


def base(model: str, tool: str, variant: str, n: int | None) -> dict:
    return {"model": model, "tool": tool, "variant": variant, "n": n}


def calib_cmd() -> str:
    return str(VENVS / "calib" / "bin" / "calib")


@functools.cache
def compile_calib() -> None:
    """Byte-compile this checkout's ``calib`` once per run, as installing a wheel does (pip compiles what it
    installs; an editable install leaves it to the first import, and ``PYTHONDONTWRITEBYTECODE=1``, set on
    some machines, turns that off: every calib process then compiles about a hundred modules, 0.25 s, which
    no installed peer pays). Incremental: only changed sources are recompiled."""
    python = venv_python("calib")
    if python.exists():
        subprocess.run([str(python), "-m", "compileall", "-q", str(REPO / "calib")], check=False,
                       stdout=subprocess.DEVNULL)


def calib_env() -> dict[str, str]:
    """The calib venv's CLI runs this checkout's calib: the venv is shared by worktrees (editable from
    whichever checkout created it), so the repository goes first on PYTHONPATH. Compiles it first
    (``compile_calib``)."""
    compile_calib()
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
