"""Cached wrappers around calib for the dashboard pages, and background jobs.

Pages call only these functions (and ``calib`` objects they return). Everything
derived from a run is cached on the run's directory (its id is part of it):
``st.cache_resource`` for large read-only objects (statistics, models, ORT work),
``st.cache_data`` for small tables. Nothing here writes into an existing run:
new runs are made by ``calib.pipeline.execute`` in a new directory, and edited
calibration sets are written as manifests under ``<store>/.calib-sets/``.

Long work (a new run, a re-calibration, the drift analysis) runs in a background
thread held by a ``Jobs`` registry that survives reruns; pages poll it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import streamlit as st

from calib.errors import CalibError, RunStoreError
from calib.runs import Run, RunInfo, RunStore

STORE_ENV = "CALIB_STORE"
SETS_DIR = ".calib-sets"


# ---- the store ----------------------------------------------------------------------


def store_root() -> Path:
    """The run store: ``--store`` after ``--`` on the streamlit command line, else $CALIB_STORE, else ./calib-runs."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--store", default=None)
    args, _ = p.parse_known_args(sys.argv[1:])
    root = args.store or os.environ.get(STORE_ENV) or "calib-runs"
    return Path(root).expanduser().resolve()


def store() -> RunStore:
    return RunStore(store_root())


def list_runs() -> list[RunInfo]:
    """Every run directory, newest first (cheap: reads each run.json)."""
    return store().list()


def get_run(run_id: str) -> Run:
    return store().get(run_id)


def run_key(run: Run) -> str:
    """Cache key of a run: its directory and the mtime of its manifest (a running run changes)."""
    mf = run.dir / "run.json"
    return f"{run.dir}@{mf.stat().st_mtime_ns if mf.exists() else 0}"


def selected_runs() -> list[str]:
    return list(st.session_state.get("selected_runs", []))


def select_runs(ids: list[str]) -> None:
    st.session_state["selected_runs"] = list(ids)[:2]


# ---- artifacts of one run (cached) --------------------------------------------------------


@st.cache_resource(max_entries=8, show_spinner="Loading statistics…")
def _stats(path: str, key: str):
    from calib.stats import ActivationStats

    return ActivationStats.load(path)


def stats(run: Run):
    p = run.artifact("stats")
    if p is None or not p.exists():
        raise RunStoreError(f"run {run.id} has no activation statistics (stats.npz)",
                            hint="the run did not get past collection; start a new run")
    return _stats(str(p), run_key(run))


@st.cache_resource(max_entries=16, show_spinner=False)
def _ranges(path: str, key: str):
    from calib.calibrate import load_ranges

    return load_ranges(path)


def ranges(run: Run) -> dict:
    """method -> Ranges of the run."""
    p = run.artifact("ranges")
    if p is None or not p.exists():
        raise RunStoreError(f"run {run.id} has no ranges.json", hint="the run stopped before calibration")
    return _ranges(str(p), run_key(run))


@st.cache_data(max_entries=32, show_spinner=False)
def _compare_rows(path: str, key: str) -> dict:
    import json

    from calib.compare.report import CompareReport

    rep = CompareReport.from_json(json.loads(Path(path).read_text()))
    return {"layers": rep.layers, "outputs": rep.outputs, "n_samples": rep.n_samples}


def compare_methods(run: Run) -> list[str]:
    """Methods with a per-layer comparison in this run."""
    return [k.split(":", 1)[1] for k in run.manifest.get("artifacts", {}) if k.startswith("compare:")]


def compare_report(run: Run, method: str) -> dict:
    """``{"layers": [...], "outputs": {...}, "n_samples": n}`` of one method's compare JSON."""
    p = run.artifact(f"compare:{method}")
    if p is None or not p.exists():
        raise RunStoreError(f"run {run.id} has no comparison for method '{method}'")
    return _compare_rows(str(p), run_key(run))


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def _model(path: str, mtime: int):
    from calib.model import load_model

    return load_model(path)


def model_of(run: Run):
    """The run's FP32 model, checked to be the file the run used."""
    from calib.errors import ModelError

    m = run.manifest.get("model") or {}
    p = Path(m.get("path", ""))
    if not m.get("path") or not p.is_file():
        raise ModelError(f"the model of run {run.id} no longer exists at {p}",
                         hint="restore the file there, or start a new run with the model's new path")
    model = _model(str(p), p.stat().st_mtime_ns)
    if m.get("sha256") and model.sha256 != m["sha256"]:
        raise ModelError(f"{p} changed since run {run.id} (sha256 {model.sha256[:12]}…, the run used "
                         f"{m['sha256'][:12]}…)", hint="start a new run on the changed model")
    return model


def preprocess_of(run: Run) -> dict | None:
    p = run.artifact("preprocess")
    if p is not None and p.exists():
        return run.read_json("preprocess")
    cfg = config_dict(run)
    return cfg.get("preprocess") or None


def open_data(run: Run, path: str | Path, *, skip_bad: bool = True):
    """A data source for ``path`` read the way the run read its data (same preprocessing)."""
    from calib.pipeline import open_run_data

    return open_run_data(Path(path), model_of(run), preprocess=preprocess_of(run), skip_bad=skip_bad)


def config_dict(run: Run) -> dict:
    try:
        return run.read_json("config")
    except RunStoreError:
        return {}


def run_config(run: Run, **changes: Any):
    """The run's ``RunConfig`` with ``changes`` applied (paths as ``Path``)."""
    from dataclasses import fields

    from calib.config import RunConfig

    d = config_dict(run)
    if not d:
        raise RunStoreError(f"run {run.id} has no config.json; cannot re-run it",
                            hint="start a new run from the Runs page")
    kw = {}
    for f in fields(RunConfig):
        if f.name in d:
            v = d[f.name]
            if f.name in ("store", "model", "calib_data", "source") and v is not None:
                v = Path(v)
            if f.name == "eval_data" and v:
                v = Path(v)
            kw[f.name] = v
    kw.update(changes)
    return RunConfig(**kw)


def calib_ids(run: Run) -> list[str] | None:
    """The ids the run calibrated on when it used a subset (calib_ids.json or subset.json), else None."""
    arts = run.manifest.get("artifacts", {})
    if "calib_ids" in arts:
        return [str(x) for x in run.read_json("calib_ids")]
    if "subset" in arts:
        return [str(x) for x in run.read_json("subset").get("ids", [])]
    return None


@dataclass
class SampleTable:
    ids: list[str]
    labels: list[int | None]
    classes: list[str] | None
    files: list[str | None]
    skipped: dict[str, str]


def calibration_set(run: Run) -> tuple[Any, SampleTable]:
    """The run's calibration samples: (source restricted to them, a table of id/label/file)."""
    data = (run.manifest.get("data") or {}).get("path", "")
    if not data or not Path(data).exists():
        raise RunStoreError(f"the calibration data of run {run.id} no longer exists at {data!r}",
                            hint="restore it, or start a new run from the Runs page")
    src = open_data(run, data)
    ids = calib_ids(run)
    if ids is not None:
        src = subset_by_ids(src, ids)
    return src, sample_table(src)


def subset_by_ids(src, ids: list[str]):
    """``src`` restricted to these sample ids (in this order); a missing id is an error naming it."""
    from calib.data.sampling import pool_ids
    from calib.errors import InputDataError

    index = {sid: k for k, sid in enumerate(pool_ids(src))}
    missing = [i for i in ids if i not in index]
    if missing:
        raise InputDataError(f"sample '{missing[0]}' of the run's calibration set is not in its data any more "
                             f"({len(missing)} missing)", hint="the data changed since the run; start a new run")
    return src.subset([index[i] for i in ids])


def sample_table(src) -> SampleTable:
    items = getattr(src, "items", None)
    if items is not None:
        return SampleTable([i for _, i, _ in items], [lab for _, _, lab in items], getattr(src, "classes", None),
                           [str(f) for f, _, _ in items], dict(getattr(src, "skipped", {})))
    from calib.data.sampling import pool_ids, pool_labels

    ids = pool_ids(src)
    labels = pool_labels(src) or [None] * len(ids)
    return SampleTable(ids, labels, None, [None] * len(ids), {})


def class_name(table: SampleTable, label: int | None) -> str:
    if label is None:
        return ""
    if table.classes and 0 <= label < len(table.classes):
        return table.classes[label]
    return str(label)


@st.cache_data(max_entries=2048, show_spinner=False)
def thumbnail(path: str, mtime: int, size: int = 160):
    """A small RGB copy of an image file (None if unreadable)."""
    from calib.data.sources import read_image
    from calib.errors import InputDataError

    try:
        im = read_image(Path(path), Path(path).name)
    except InputDataError:
        return None
    im = im.convert("RGB")
    im.thumbnail((size, size))
    return im


def thumb(path: str | None):
    if not path or not Path(path).is_file():
        return None
    return thumbnail(path, Path(path).stat().st_mtime_ns)


def scan_folder(run: Run, folder: str) -> tuple[Any, SampleTable]:
    """Open an image folder the run's way and decode every image; unreadable ones end up in ``skipped``."""
    src = open_data(run, folder, skip_bad=True)
    if hasattr(src, "image"):
        for i in range(len(src)):
            im = src.image(i)
            if im is not None:
                im.close()
        bad = set(src.skipped)
        if bad:
            keep = [k for k, (_, sid, _) in enumerate(src.items) if sid not in bad]
            skipped = dict(src.skipped)
            src = src.subset(keep)
            src.skipped = skipped
    return src, sample_table(src)


# ---- edited calibration sets --------------------------------------------------------------


def write_calibration_manifest(files: list[tuple[str, int | None]]) -> Path:
    """Write a CSV manifest (absolute path, label index) under ``<store>/.calib-sets/`` and return its path."""
    from calib.io import write_text

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
    out = store_root() / SETS_DIR / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{digest}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, text)
    return out


# ---- background jobs -------------------------------------------------------------------------


@dataclass
class Job:
    """One piece of long work running in a thread; ``progress`` is what the page draws."""

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

    @property
    def running(self) -> bool:
        return self.finished is None

    def progress(self, stage: str, done: int, total: int | None) -> None:
        self.stage, self.done, self.total = stage, int(done), total

    @property
    def fraction(self) -> float:
        if not self.total:
            return 0.0
        return max(0.0, min(1.0, self.done / self.total))


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
            job = Job(key, kind, label)

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

            job.thread = threading.Thread(target=work, name=f"calib-job-{kind}", daemon=True)
            self._jobs[key] = job
            job.thread.start()
            return job

    def forget(self, key: str) -> None:
        with self._lock:
            j = self._jobs.get(key)
            if j is not None and not j.running:
                del self._jobs[key]


@st.cache_resource
def jobs() -> Jobs:
    return Jobs()


def start_run(key: str, label: str, cfg, *, calib_ids: list[str] | None = None,
              command: list[str] | None = None) -> Job:
    """Run ``calib.pipeline.execute(cfg)`` into the store in the background; the result is the new run id."""
    from calib.pipeline import execute

    def fn(job: Job) -> str:
        run = execute(cfg, store=store(), command=command or ["calib", "dashboard"], progress=job.progress,
                      calib_ids=calib_ids)
        return run.id

    return jobs().start(key, "run", label, fn)


# ---- drift (calibration vs evaluation data) ---------------------------------------------------


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
    from calib.collect import collect
    from calib.drift import embed, novelty, tensor_drift

    model = model_of(run)
    calib_stats = stats(run)
    rng = ranges(run)
    calib_src, _ = calibration_set(run)
    eval_src = open_data(run, eval_path, skip_bad=True)
    batch = int(config_dict(run).get("batch_size", 8) or 8)

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


def histogram_tensors(run: Run, node: str | None, tensor: str) -> tuple[list[str], str]:
    """Quantized tensors to show for a layer: its output if it was calibrated, else its calibrated inputs.

    Returns (tensors, why). Finding a node's inputs needs the model; without it only the output is tried.
    """
    st_ = stats(run)
    if tensor in st_.tensors:
        return [tensor], "the layer's output"
    if not node:
        return [], ""
    try:
        model = model_of(run)
    except CalibError as e:
        return [], f"cannot look up the inputs of {node}: {e}"
    n = model.nodes.get(node)
    ins = [t for t in (n.input if n is not None else []) if t in st_.tensors]
    return ins, f"the calibrated input{'s' if len(ins) > 1 else ''} of {node} (its output is not quantized)"


# ---- one layer on demand -----------------------------------------------------------------------


@st.cache_resource(max_entries=16, show_spinner="Running FP32 and INT8 on a few samples…")
def _layer_values(key: str, method: str, fp32_tensor: str, qdq_tensor: str, n: int, _run: Run, data: str):
    import onnx

    from calib.drift import layer_values

    model = model_of(_run)
    qp = _run.artifact(f"qdq:{method}")
    if qp is None or not qp.exists():
        raise RunStoreError(f"run {_run.id} has no Q/DQ model for method '{method}'")
    src = open_data(_run, data)
    return layer_values(model, onnx.load(str(qp)), src, fp32_tensor, qdq_tensor, n_samples=n)


def layer_values(run: Run, method: str, fp32_tensor: str, qdq_tensor: str, n: int = 4):
    d = run.manifest.get("data") or {}
    data = d.get("eval") or d.get("path", "")
    if not data or not Path(data).exists():
        raise RunStoreError(f"the evaluation data of run {run.id} no longer exists at {data!r}")
    return _layer_values(str(run.dir), method, fp32_tensor, qdq_tensor, n, run, data)


# ---- small helpers for pages -------------------------------------------------------------------


def show_error(e: Exception, what: str = "") -> None:
    """A CalibError in the page: message, hint; other errors with their type."""
    msg = str(e) if isinstance(e, CalibError) else f"{type(e).__name__}: {e}"
    st.error((what + ": " if what else "") + msg)
    hint = getattr(e, "hint", None)
    if hint:
        st.caption(f"hint: {hint}")


def no_store_message() -> None:
    root = store_root()
    st.info(f"No runs in **{root}** yet. Make one with `calib demo` (the bundled document-orientation demo) or "
            "`calib run CONFIG.toml`, start one below, or point the dashboard at another store with "
            "`calib dashboard --store DIR`.")


def pick_run(label: str, key: str, *, default_index: int = 0, complete_only: bool = False) -> Run | None:
    """A selectbox over the store's runs (selected runs first); returns the loaded run or None."""
    infos = [i for i in list_runs() if i.status != "unreadable"]
    if complete_only:
        infos = [i for i in infos if i.status == "complete"]
    if not infos:
        no_store_message()
        return None
    chosen = selected_runs()
    ids = [i.id for i in infos]
    ordered = [c for c in chosen if c in ids] + [i for i in ids if i not in chosen]
    status = {i.id: i.status for i in infos}
    rid = st.selectbox(label, ordered, index=min(default_index, len(ordered) - 1), key=key,
                       format_func=lambda r: r if status[r] == "complete" else f"{r} ({status[r]})")
    try:
        run = get_run(rid)
    except CalibError as e:
        show_error(e)
        return None
    if not run.is_complete:
        st.warning(f"run {run.id} is {run.status}" + (f": {run.manifest.get('error')}" if run.manifest.get("error")
                                                     else "") + "; showing what it wrote.")
    return run
