"""Merging many shards of statistics fast, and re-merging after some are dropped, exactly.

``merge_all`` merges any number of ``ActivationStats`` in one vectorised step: every histogram is
downsampled to the largest width and the counts summed (integers), min of the minima, max of the
maxima. That is what pairwise ``ActivationStats.merge`` gives, bit for bit (downsampling composes).

``merge_without`` re-merges a run's total without some of its shards and *without reading the
shards kept*: counts are integers, so on the total's grid ``total - dropped`` is exact; min and max
are not subtractable, so a small index (``write_index``: per shard and tensor the width exponent,
min and max) gives the kept shards' min, max and largest width directly. Where the kept shards'
largest width is below the total's (a dropped shard held the largest value), a fresh collection
would use the finer grid, which subtraction cannot recover: those tensors only are merged again
from the kept shards' files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from calib.errors import RunStoreError
from calib.stats import LOG2_BINS, NUM_BINS, ActivationStats

__all__ = ["merge_all", "merge_without", "index_rows", "write_index", "read_index"]

_COLS = ("pos", "neg", "exp", "min", "max", "n", "n_nonfinite")


def _down(rows: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Each row of counts ``rows`` [T, NUM_BINS] downsampled by ``shift[t]`` >= 0 (``calib._kernels.downsample``)."""
    if not (shift > 0).any():
        return rows.astype(np.int64, copy=False)  # callers never write into it
    out = rows.astype(np.int64, copy=True)
    for d in np.unique(shift[shift > 0]):
        sel = np.flatnonzero(shift == d)
        part = rows[sel].astype(np.int64)
        out[sel] = 0
        if d >= LOG2_BINS:
            out[sel, 0] = part.sum(1)
        else:
            out[sel, :NUM_BINS >> d] = part.reshape(len(sel), NUM_BINS >> d, 1 << d).sum(2)
    return out


def _columns(stats: ActivationStats, names: Sequence[str]) -> dict[str, np.ndarray]:
    a = stats.to_arrays()
    order = {n: k for k, n in enumerate(a["names"].tolist())}
    if set(order) != set(names):
        raise RunStoreError("the shards hold different tensors; re-run instead of re-calibrating")
    idx = [order[n] for n in names]
    return {k: a[k][idx] for k in _COLS}


def _build(template: ActivationStats, names: Sequence[str], c: dict[str, np.ndarray], n_samples: int,
           digest: int) -> ActivationStats:
    """ActivationStats from merged columns (provenance and meta of ``template``)."""
    a = template.to_arrays()
    header = json.loads(str(a["header"]))
    header.update(n_samples=int(n_samples), sample_digest=str(int(digest) % (1 << 64)))
    a.update(c, header=np.array(json.dumps(header, sort_keys=True)), names=np.array(list(names), dtype=str))
    return ActivationStats.from_arrays(a, source="merged shards")


def merge_all(shards: Sequence[ActivationStats]) -> ActivationStats:
    """The merge of ``shards`` (module doc); equals pairwise ``ActivationStats.merge`` bit for bit."""
    if len(shards) == 1:
        return shards[0]
    names = list(shards[0].tensors)
    cols = [_columns(s, names) for s in shards]
    e = np.max([c["exp"] for c in cols], axis=0)
    out = {"exp": e, "min": np.min([c["min"] for c in cols], axis=0), "max": np.max([c["max"] for c in cols], axis=0),
           "n": np.sum([c["n"] for c in cols], axis=0), "n_nonfinite": np.sum([c["n_nonfinite"] for c in cols], axis=0)}
    for k in ("pos", "neg"):
        out[k] = sum(_down(c[k], e - c["exp"]) for c in cols)
    return _build(shards[0], names, out, sum(s.n_samples for s in shards), sum(s.sample_digest for s in shards))


def index_rows(stats: ActivationStats, names: Sequence[str]) -> np.ndarray:
    """One shard's index row: [3, T] float64 of width exponent, min and max per tensor (exact)."""
    return np.stack([np.array([float(stats.tensors[t].exp) for t in names]),
                     np.array([stats.tensors[t].min for t in names]), np.array([stats.tensors[t].max for t in names])])


def write_index(path: Path, names: Sequence[str], rows: Sequence[np.ndarray]) -> None:
    np.savez(path, names=np.array(list(names), dtype=str), rows=np.stack(rows))


def read_index(path: Path | None) -> tuple[list[str], np.ndarray] | None:
    """(tensor names, rows [S, 3, T]) or None when the run has no index (older runs)."""
    if path is None or not Path(path).is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        return z["names"].tolist(), z["rows"]


def merge_without(total: ActivationStats, dropped: Sequence[ActivationStats], index: tuple[list[str], np.ndarray],
                  kept: Sequence[int], kept_files: Sequence[Path]) -> ActivationStats:
    """The merge of the kept shards (positions ``kept`` in ``index``; their files ``kept_files``), computed as
    ``total`` minus the ``dropped`` shards (module doc); equal bit for bit to ``merge_all`` of the kept shards."""
    names, rows = index
    tc = _columns(total, names)
    kept_rows = rows[list(kept)]
    e = kept_rows[:, 0].max(0).astype(np.int64)
    out = {"exp": e, "min": kept_rows[:, 1].min(0), "max": kept_rows[:, 2].max(0)}
    gone = [_columns(g, names) for g in dropped]
    for k in ("pos", "neg"):
        out[k] = tc[k].astype(np.int64) - sum((_down(g[k], tc["exp"] - g["exp"]) for g in gone),
                                              np.zeros_like(tc[k], dtype=np.int64))
    for k in ("n", "n_nonfinite"):
        out[k] = tc[k] - sum((g[k] for g in gone), np.zeros_like(tc[k]))
    finer = np.flatnonzero(e != tc["exp"])
    if len(finer):  # a dropped shard set the width: merge these tensors again from the kept shards
        again = merge_all([ActivationStats.load(f) for f in kept_files])
        ac = _columns(again, names)
        for k in ("pos", "neg"):
            out[k][finer] = ac[k][finer]
    if (out["pos"] < 0).any() or (out["neg"] < 0).any() or (out["n"] < 0).any():
        raise RunStoreError("the run's statistics are not the merge of its shards", hint="re-run it")
    return _build(total, names, out, total.n_samples - sum(g.n_samples for g in dropped),
                  total.sample_digest - sum(g.sample_digest for g in dropped))
