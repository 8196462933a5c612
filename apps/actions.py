"""What the dashboard runs: background jobs (a new run, a re-calibration, the drift analysis) and the
edited calibration sets it writes. ``state.py`` holds what it reads and caches.

Jobs run in threads of the Streamlit server; a ``Jobs`` registry (``st.cache_resource``) survives
reruns. Each job also writes its progress to ``<store>/.calib-jobs/<key>.json`` (atomically, a few
times a second), so any browser session, even one opened after the job started, sees it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import streamlit as st

import state
from calib.collect import collect
from calib.drift import embed, novelty, tensor_drift
from calib.drift_verdict import range_setters
from calib.errors import CalibError
from calib.io import write_text
from calib.pipeline import execute
from calib.recalibrate import recalibrate
from calib.runs import Run

SETS_DIR = ".calib-sets"
JOBS_DIR = ".calib-jobs"
WRITE_EVERY_S = 0.25


# ---- edited calibration sets --------------------------------------------------------------


def write_calibration_manifest(files: list[tuple[str, int | None]]) -> Path:
    """Write a CSV manifest (absolute path, label index) under ``<store>/.calib-sets/`` and return its path."""
    if not files:
        raise CalibError("the edited calibration set is empty", hint="keep or add at least one sample")
    labelled = all(lab is not None for _, lab in files)
    lines = ["path,label" if labelled else "path"]
    for f, lab in files:
        p = str(Path(f).resolve())
        if "," in p or '"' in p or "\n" in p:
            p = '"' + p.replace('"', '""') + '"'
        lines.append(f"{p},{int(lab)}" if labelled else p)
    text = "\n".join(lines) + "\n"
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    out = state.store_root() / SETS_DIR / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{digest}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, text)
    return out


# ---- background jobs -------------------------------------------------------------------------


@dataclass
class Job:
    """One piece of long work running in a thread; ``progress`` is what the pages draw."""

    id: str
    kind: str
    label: str
    stage: str = "starting"
    done: int = 0
    total: int | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    result: Any = None
    error: str | None = None
    hint: str | None = None
    thread: threading.Thread | None = None
    file: Path | None = None
    _written: float = 0.0

    @property
    def running(self) -> bool:
        return self.finished is None

    def progress(self, stage: str, done: int, total: int | None) -> None:
        self.stage, self.done, self.total = stage, int(done), total
        if time.time() - self._written >= WRITE_EVERY_S:
            self.write()

    @property
    def fraction(self) -> float:
        if not self.total:
            return 0.0
        return max(0.0, min(1.0, self.done / self.total))

    def record(self) -> dict[str, Any]:
        keep = ("id", "kind", "label", "stage", "done", "total", "started", "finished", "error")
        d = {k: getattr(self, k) for k in keep}  # not asdict: it would deep-copy the thread and the result
        d["result"] = self.result if isinstance(self.result, (str, int, float)) else None
        d["pid"] = os.getpid()
        return d

    def write(self) -> None:
        if self.file is None:
            return
        self._written = time.time()
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            write_text(self.file, json.dumps(self.record()))
        except OSError:  # progress is a courtesy: a read-only store must not fail the job
            pass


def job_file(key: str) -> Path:
    return state.store_root() / JOBS_DIR / (re.sub(r"[^A-Za-z0-9_.-]+", "_", key)[-120:] + ".json")


def _pid_alive(pid: int | None) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def store_jobs(max_age_s: float = 600.0) -> list[dict[str, Any]]:
    """Every job of this store from its progress file: running ones, and those finished in the last ``max_age_s``."""
    folder = state.store_root() / JOBS_DIR
    out = []
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if d.get("finished") is None and not _pid_alive(d.get("pid")):
            d["finished"], d["error"] = d.get("started"), "the dashboard that ran it stopped"
        if d.get("finished") is None or time.time() - float(d["finished"]) < max_age_s:
            out.append(d)
    return out


class Jobs:
    """Jobs by key; at most one running job per key."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Job | None:
        return self._jobs.get(key)

    def all(self) -> list[Job]:
        return list(self._jobs.values())

    def start(self, key: str, kind: str, label: str, fn: Callable[[Job], Any]) -> Job:
        with self._lock:
            old = self._jobs.get(key)
            if old is not None and old.running:
                return old
            job = Job(key, kind, label, file=job_file(key))
            job.write()

            def work() -> None:
                try:
                    job.result = fn(job)
                except CalibError as e:
                    job.error, job.hint = str(e), e.hint
                except Exception as e:  # a bug: keep the traceback visible
                    job.error = f"{type(e).__name__}: {e}"
                    job.hint = traceback.format_exc(limit=6)
                finally:
                    job.finished = time.time()
                    job.write()

            serialize_ast_parse()  # before the first job thread runs beside the page scripts
            job.thread = threading.Thread(target=work, name=f"calib-job-{kind}", daemon=True)
            self._jobs[key] = job
            job.thread.start()
            return job

    def forget(self, key: str) -> None:
        with self._lock:
            j = self._jobs.get(key)
            if j is not None and not j.running:
                del self._jobs[key]


_AST_LOCK = threading.RLock()


def serialize_ast_parse() -> None:
    """Make ``ast.parse`` one thread at a time in this process (idempotent).

    CPython 3.11 keeps one AST-constructor recursion counter per interpreter (gh-106905): two threads building
    AST objects at once can fail with "SystemError: AST constructor recursion depth mismatch". A job thread
    does (numpy reads every .npy/.npz header with ``ast.literal_eval``) while Streamlit parses a page script
    for its "magic"; seen once in CI as a page that failed to render. ``ast.literal_eval`` calls the module's
    ``parse``, so this one wrapper covers both."""
    import ast

    if getattr(ast.parse, "_calib_serialized", False):
        return
    original = ast.parse

    def parse(*args, **kwargs):
        with _AST_LOCK:
            return original(*args, **kwargs)

    parse._calib_serialized = True  # type: ignore[attr-defined]
    parse.__wrapped__ = original  # type: ignore[attr-defined]
    ast.parse = parse


@st.cache_resource
def jobs() -> Jobs:
    return Jobs()


def start_run(key: str, label: str, cfg, *, calib_ids: list[str] | None = None,
              command: list[str] | None = None) -> Job:
    """Run ``calib.pipeline.execute(cfg)`` into the store in the background; the result is the new run id."""
    def fn(job: Job) -> str:
        run = execute(cfg, store=state.store(), command=command or ["calib", "dashboard"], progress=job.progress,
                      calib_ids=calib_ids)
        return run.id

    return jobs().start(key, "run", label, fn)


def start_recalibrate(key: str, run: Run, keep_ids: list[str]) -> Job:
    """Ranges-only re-calibration on ``keep_ids`` (``calib.recalibrate``): touched shards only, no new advise."""
    model = state.model_of(run)
    data = (run.manifest.get("data") or {}).get("path", "")
    src = state.open_data(run, data)

    def fn(job: Job) -> str:
        res = recalibrate(state.store(), run, model, src, keep_ids, progress=job.progress,
                          command=["calib", "dashboard", "re-calibrate", run.id])
        return res.run.id

    return jobs().start(key, "recalibrate", f"re-calibration of {run.id} (ranges only)", fn)


@dataclass
class DriftResult:
    rows: list[dict]  # TensorDrift.to_row()
    methods: list[str]
    novelty: list[dict]  # Novelty.rows()
    feature_tensor: str
    n_calib: int
    n_eval: int
    eval_path: str
    skipped: dict[str, str]
    files: dict[str, str]  # eval id -> file


def drift_key(run: Run, eval_path: str) -> str:
    return f"drift:{run.dir}:{eval_path}"


def start_drift(run: Run, eval_path: str, *, limit: int | None = None) -> Job:
    """Collect evaluation statistics and sample features in the background (nothing is written)."""
    model = state.model_of(run)
    calib_stats = state.stats(run)
    rng = state.ranges(run)
    calib_src, _ = state.calibration_set(run)
    eval_src = state.open_data(run, eval_path, skip_bad=True)
    batch = int(state.config_dict(run).get("batch_size", 8) or 8)

    def fn(job: Job) -> DriftResult:
        ev = collect(model, eval_src, tensors=list(calib_stats.tensors), batch_size=batch, limit=limit,
                     progress=job.progress)
        drift = tensor_drift(calib_stats, ev, rng, depth=model.tensor_depth)
        ec = embed(model, calib_src, batch_size=batch, progress=lambda s, d, t: job.progress("features (calib)", d, t))
        ee = embed(model, eval_src, tensor=ec.tensor, batch_size=batch,
                   progress=lambda s, d, t: job.progress("features (eval)", d, t))
        nov = novelty(ec, ee)
        files = {}
        for f, sid, _ in getattr(eval_src, "items", []):
            files[sid] = str(f)
        return DriftResult([d.to_row() for d in drift], list(rng), nov.rows(), ec.tensor, len(ec.ids), len(ee.ids),
                           str(eval_path), dict(getattr(eval_src, "skipped", {})), files)

    return jobs().start(drift_key(run, eval_path), "drift", f"drift of {run.id}", fn)




# ---- per-sample signals of the calibration set --------------------------------------------------


@dataclass
class SampleSignals:
    rows: dict[str, dict]  # id -> {"ranges_set", "outlier_ranges", "outlier", "unlike_eval"}
    setters: dict[str, str]  # tensor -> id of the sample that sets its max
    eval_path: str | None


def signals_key(run: Run) -> str:
    return f"signals:{run.dir}"


def start_signals(run: Run) -> Job:
    """Per calibration sample: ranges it sets (one FP32 pass), outliers, and distance to the evaluation data."""
    model = state.model_of(run)
    calib_src, _ = state.calibration_set(run)
    tensors = list(state.stats(run).tensors)
    batch = int(state.config_dict(run).get("batch_size", 8) or 8)
    ev_path = (run.manifest.get("data") or {}).get("eval") or None
    eval_src = state.open_data(run, ev_path, skip_bad=True) if ev_path and Path(ev_path).exists() else None

    def fn(job: Job) -> SampleSignals:
        rs = range_setters(model, calib_src, tensors, batch_size=batch, progress=job.progress)
        rows = {r["id"]: {**r, "unlike_eval": None} for r in rs.per_sample()}
        if eval_src is not None:
            ee = embed(model, eval_src, batch_size=batch, progress=lambda s, d, t: job.progress("features (eval)", d, t))
            ec = embed(model, calib_src, tensor=ee.tensor, batch_size=batch,
                       progress=lambda s, d, t: job.progress("features (calib)", d, t))
            for r in novelty(ee, ec).rows():  # calibration samples scored against the evaluation set
                rows[r["id"]]["unlike_eval"] = r["score"]
        return SampleSignals(rows, rs.setters(), ev_path)

    return jobs().start(signals_key(run), "signals", f"per-sample signals of {run.id}", fn)
