"""What the core reads: data sources (with preprocessing, subsets, sampling), the statistics key, and the
non-finite policy (tensors whose statistics saw NaN/inf stay float on every entry point)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from calib.calibrate import Ranges
from calib.data import ListSource
from calib.data.preprocess import PreprocessSpec
from calib.data.sampling import Subset
from calib.subset import sample_source
from calib.data.sources import open_source
from calib.errors import InputDataError
from calib.model import Model

__all__ = ["open_run_data", "subset_by_ids", "stats_key", "mark_flagged", "sample_subset"]


def open_run_data(path: Path, model: Model, *, preprocess: dict | None = None, skip_bad: bool = False):
    """Open a data path (arrays, image folder, manifest, tokens) with an optional preprocessing spec."""
    spec = PreprocessSpec.from_dict(preprocess) if preprocess else None
    return open_source(path, model, spec=spec, skip_bad=skip_bad)


def subset_by_ids(source, ids: Sequence[str]):
    """The samples of ``source`` with these ids, in this order, still read lazily."""
    have = source.ids() if hasattr(source, "ids") else [smp.id for smp in source]
    index = {sid: i for i, sid in enumerate(have)}
    missing = [i for i in ids if i not in index]
    if missing:
        raise InputDataError(f"sample '{missing[0]}' is not in the data ({len(missing)} id(s) missing)",
                             hint="the data changed since the subset was made; resample")
    if hasattr(source, "subset"):
        return source.subset([index[i] for i in ids])
    wanted = set(ids)
    picked = {smp.id: smp for smp in source if smp.id in wanted}
    return ListSource([picked[i] for i in ids], layout=getattr(source, "layout", "batch"), name="subset")


def sample_subset(source, model: Model, *, strategy: str, n: int, seed: int, data: str, batch_size: int,
                  progress=None) -> tuple[Any, Subset]:
    """``[sampling]``: choose ``n`` samples of ``source`` (features from ``model`` for kmeans/kcenter)."""
    sel = sample_source(source, n, strategy, model=model, seed=seed, data=data, batch_size=batch_size,
                        progress=progress)
    return subset_by_ids(source, sel.ids), sel


def stats_key(model: Model, tensors: Sequence[str], extra: dict) -> str:
    h = hashlib.sha256()
    h.update(model.sha256.encode())
    h.update("\0".join(tensors).encode())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def mark_flagged(ranges: dict[str, Ranges], flagged: dict[str, str]) -> dict[str, Ranges]:
    """Every method's ranges with the flagged tensors marked non-finite, so that each export made from
    them (advise's included, which takes ranges and no ``flagged=``) leaves those tensors float."""
    if not flagged:
        return ranges
    out = {}
    for label, r in ranges.items():
        tensors = {t: (dataclasses.replace(tr, degenerate=f"non-finite values: {flagged[t]}")
                       if t in flagged else tr) for t, tr in r.tensors.items()}
        out[label] = Ranges(r.method, tensors, r.model_sha256)
    return out
