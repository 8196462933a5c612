"""Differences between two runs: metrics, excluded nodes and ranges (``calib diff``, dashboard)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from calib.calibrate import load_ranges
from calib.errors import RunStoreError
from calib.runs import Run

__all__ = ["RunDiff", "diff_runs", "run_excluded"]


@dataclass
class RunDiff:
    a_id: str
    b_id: str
    method_a: str
    method_b: str
    metrics: dict[str, tuple[Any, Any]]
    excluded_only_a: list[str]
    excluded_only_b: list[str]
    ranges: list[tuple[str, float, float]]  # common tensors, largest |log(b/a)| first
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    n_changed: int = 0
    n_common: int = 0


def run_excluded(run: Run) -> list[str]:
    """Nodes the run leaves in float: advise's choice plus the configured exclude list."""
    out: list[str] = []
    cfg = run.read_json("config") if run.artifact("config") else {}
    out.extend(cfg.get("exclude", []) if isinstance(cfg, dict) else [])
    p = run.artifact("advise")
    if p is not None and p.exists():
        adv = run.read_json("advise")
        out.extend(x for x in adv.get("exclude", []) if x not in out)
    return out


def _primary_ranges(run: Run) -> tuple[str, dict[str, float]]:
    p = run.artifact("ranges")
    if p is None or not p.exists():
        raise RunStoreError(f"run {run.id}: no ranges.json (status {run.status})")
    all_ranges = load_ranges(p)
    method = run.manifest.get("method") or next(iter(all_ranges))
    r = all_ranges.get(method) or next(iter(all_ranges.values()))
    return r.method, r.amax()


def diff_runs(a: Run, b: Run) -> RunDiff:
    ma, ra = _primary_ranges(a)
    mb, rb = _primary_ranges(b)
    keys = list(dict.fromkeys(list(a.manifest.get("metrics", {})) + list(b.manifest.get("metrics", {}))))
    metrics = {k: (a.manifest.get("metrics", {}).get(k), b.manifest.get("metrics", {}).get(k)) for k in keys}
    metrics["n_samples"] = (a.manifest.get("n_samples"), b.manifest.get("n_samples"))
    ea, eb = run_excluded(a), run_excluded(b)
    common = [t for t in ra if t in rb]
    import math

    rows = sorted(((t, ra[t], rb[t]) for t in common), key=lambda r: -abs(math.log(r[2] / r[1])))
    return RunDiff(a.id, b.id, ma, mb, metrics, [x for x in ea if x not in eb], [x for x in eb if x not in ea],
                   rows, [t for t in ra if t not in rb], [t for t in rb if t not in ra],
                   sum(1 for _, x, y in rows if x != y), len(common))
