"""A ``calib collect --max-memory`` bound that forces grouping on one model (runs in the ``calib`` venv).

Uses calib's own estimate (``calib.collect_groups``: bytes per sample from shape inference, a pass holds
HELD_COPIES batches of the exposed tensors, a baseline of this process's resident memory) to find the
bytes one unbounded pass would expose, then picks the bound: ``--prefer`` (1 GiB) when one pass does not
fit in it, else the baseline plus half the one-pass cost, so at least two groups. Prints one JSON object:
``bound_bytes``, ``groups`` (calib's plan at that bound), ``one_pass_bytes``/``_mb``, ``baseline_mb``.

    calib-venv/bin/python bench/peers/tools/calib_groups.py --model M.onnx --data calib_128.npz
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from calib import collect_groups as groups
from calib.config import DEFAULT_BATCH_SIZE
from calib.model import load_model


def plan(model_path: str, data: str, batch: int, prefer: int) -> dict:
    model = load_model(model_path)
    inputs = {s.name for s in model.inputs}
    fetch = [t for t in model.activation_tensors() if t not in inputs]
    with np.load(data, allow_pickle=False) as z:
        first = {k: z[k][0] for k in z.files if k in inputs}
    per_sample = groups.tensor_bytes_per_sample(model, fetch, {k: v.shape for k, v in first.items()}, "batch")
    baseline = groups.rss_bytes() or 0  # this process with the model loaded: calib measures its own the same way
    one_pass = groups.HELD_COPIES * batch * sum(per_sample.values())
    bound = prefer if baseline + one_pass > prefer else baseline + one_pass // 2
    return {"bound_bytes": int(bound), "groups": len(groups.plan_groups(fetch, per_sample, batch, bound - baseline)),
            "one_pass_bytes": int(one_pass), "one_pass_mb": round(one_pass / 2**20, 1),
            "baseline_mb": round(baseline / 2**20, 1), "tensors": len(fetch), "batch_size": batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    ap.add_argument("--prefer", type=int, default=1 << 30, help="bound in bytes when one pass does not fit in it")
    args = ap.parse_args()
    print(json.dumps(plan(args.model, args.data, args.batch_size, args.prefer)))


if __name__ == "__main__":
    main()
