"""What the dashboard reads: the run store and a run's artifacts, cached; small page helpers.

Pages read runs through these functions (and the ``calib`` objects they return). Everything
derived from a run is cached on the run's directory (its id is part of it):
``st.cache_resource`` for large read-only objects (statistics, models, ORT work),
``st.cache_data`` for small tables. Nothing here writes: what the dashboard runs (new runs,
re-calibrations, the drift analysis, edited calibration sets) lives in ``actions.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    kw.setdefault("high_precision", "fp32")  # runs recorded before the option had an FP32 remainder
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
