"""A ``calib collect --max-memory`` bound that forces grouping on one model (runs in the ``calib`` venv).

Plans the way ``calib collect`` does (``calib.collect.quick_plan`` and ``measured_plan``: the model loaded,
the data opened with calib's own reader, the process's resident memory measured after the same imports as
the command line) and reads from calib's memory model:

- ``minimum``: what calib needs at batch 1 with one tensor per pass; a bound below it is refused (exit 2);
- ``one_pass``: one pass over every tensor at the run's batch size, measured (ONNX Runtime's optimised graph
  sized on the first sample), and calib's cheaper shape-based estimate of it, which decides first.

The bound is never below ``minimum`` + ``MARGIN`` (the command line's own imports and Progress bar may take
a little more than this process) and below both one-pass costs, so calib must adapt: its own plan
(``collect_groups.fit``) groups the tensors into several passes or lowers the batch size (it prefers fewer
passes at a smaller batch). ``--prefer`` (1 GiB) if calib adapts there, else the largest such bound on a
geometric grid. Where none exists, one pass already fits: the bound is the minimum (+ margin), ``forced`` is
false and ``reason`` says why. Prints one JSON object (``bound_bytes``, ``groups`` and ``batch_size`` calib's plan at that bound,
``minimum_mb``, ``one_pass_mb``, ``quick_one_pass_mb``, ``baseline_mb``, ``forced``, ``reason``).

    calib-venv/bin/python bench/peers/tools/calib_groups.py --model M.onnx --data calib_128.npz
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import calib.cli  # noqa: F401  (the command line's imports are part of the baseline calib measures)
from calib import collect_groups as groups
from calib.collect import measured_plan, quick_plan
from calib.config import DEFAULT_BATCH_SIZE
from calib.data.uri import open_data_uri
from calib.model import load_model

MARGIN = 32 << 20  # bytes: the CLI process (typer's app, the Progress bar) over this one's baseline


def _mb(n: int) -> float:
    return round(n / 2**20, 1)


def plan(model_path: str, data: str, batch: int, prefer: int) -> dict:
    model = load_model(model_path)
    source = open_data_uri(data, model)
    inputs = {s.name for s in model.inputs}
    fetch = [t for t in model.activation_tensors() if t not in inputs]
    layout = getattr(source, "layout", "batch")
    first = next(iter(source))
    quick, est = quick_plan(model, first, fetch, layout, batch, 0)
    quick.max_memory = max(quick.peak(fetch), prefer)  # measuring in large chunks: this process is not bounded
    measured, _, fixed_batch = measured_plan(model, first, fetch, layout, quick, est, None)
    b = measured.batch_size
    low = measured.minimum + MARGIN
    top = min(quick.peak(fetch), measured.peak(fetch, b))  # a bound at or above either gives one pass

    def adapts(bound: int) -> bool:  # calib's own plan at this bound groups or lowers the batch size
        try:
            f = groups.fit(dataclasses.replace(measured, max_memory=bound), fetch, b, fixed_batch)
        except Exception:  # below what calib accepts
            return False
        return len(f.groups) >= 2 or f.batch_size < b
    # the largest such bound (prefer first): --prefer, else a geometric grid over [low, top)
    grid = [int(low * (top / low) ** (k / 24)) for k in range(24, -1, -1)] if top > low else []
    bound = next((x for x in [prefer, *grid] if low <= x < top and adapts(x)), None)
    forced = bound is not None
    bound = bound if forced else low
    reason = "" if forced else (f"one pass ({_mb(top)} MB at batch {b}) already fits under calib's minimum "
                                f"({_mb(measured.minimum)} MB: batch 1, one tensor per pass) + {MARGIN >> 20} MB")
    fitted = groups.fit(dataclasses.replace(measured, max_memory=bound), fetch, b, fixed_batch) if forced else None
    return {"bound_bytes": int(bound), "groups": len(fitted.groups) if fitted else 1,
            "batch_size": fitted.batch_size if fitted else b, "forced": forced, "reason": reason,
            "minimum_mb": _mb(measured.minimum), "one_pass_mb": _mb(measured.peak(fetch, b)),
            "quick_one_pass_mb": _mb(quick.peak(fetch)), "baseline_mb": _mb(measured.baseline),
            "tensors": len(fetch)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    ap.add_argument("--prefer", type=int, default=1 << 30, help="bound in bytes when it forces grouping")
    args = ap.parse_args()
    print(json.dumps(plan(args.model, args.data, args.batch_size, args.prefer)))


if __name__ == "__main__":
    main()
