"""Checks that ranges fit the model and the plan before anything is exported (one clear error, naming tensors)."""

from __future__ import annotations

import difflib
from typing import Iterable

from calib.calibrate.base import Ranges
from calib.errors import RangesError
from calib.export.placement import Plan
from calib.model import Model

__all__ = ["check_ranges_fit", "check_needed"]


def _few(names: Iterable[str], k: int = 5) -> str:
    names = list(names)
    more = f" (and {len(names) - k} more)" if len(names) > k else ""
    return ", ".join(repr(n) for n in names[:k]) + more


def check_ranges_fit(model: Model, ranges: Ranges) -> None:
    """Refuse ranges computed for another model (sha256 mismatch or unknown tensor names)."""
    known = set(model.producers) | {i.name for i in model.graph.input}
    foreign = [t for t in ranges if t not in known]
    sha = getattr(ranges, "model_sha256", "")
    if sha and model.sha256 and sha != model.sha256:
        detail = f"; {len(foreign)} of its {len(ranges)} tensors do not exist here, e.g. {_few(foreign, 3)}" \
            if foreign else ""
        raise RangesError(
            f"the ranges were computed for another model (model sha256 {sha[:12]}…, this model "
            f"{model.sha256[:12]}…){detail}",
            hint="collect statistics with this exact model file",
        )
    if foreign:
        close = difflib.get_close_matches(foreign[0], sorted(known), n=3)
        near = f"; closest names here: {_few(close, 3)}" if close else ""
        raise RangesError(
            f"{len(foreign)} of {len(ranges)} tensors in the ranges do not exist in the model, e.g. "
            f"{_few(foreign, 3)}{near}",
            hint="the ranges (or statistics, or cache) come from another model; collect them for this one",
        )


def check_needed(plan: Plan, ranges: Ranges) -> None:
    """Refuse a plan that quantizes a tensor the ranges do not cover (unless it was skipped on purpose)."""
    known = getattr(ranges, "tensors", ranges)  # `in` on Ranges would raise RangesError, not return False
    missing = [t for t in plan.tensors if t not in known and t not in plan.skipped]
    if missing:
        raise RangesError(
            f"no range for {len(missing)} tensor(s) the {plan.placement} placement quantizes: {_few(missing)}",
            hint="collect statistics for this model again, or keep the tensor float with --exclude NAME",
        )
