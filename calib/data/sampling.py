"""Representative calibration subsets: random, stratified, kmeans and kcenter, deterministic with a seed.

* ``random``: a seeded permutation's first ``n`` samples.
* ``stratified``: scikit-learn's stratified split by label; every class gets
  ``floor`` or ``ceil`` of ``n * share`` samples (label proportions kept within one sample).
* ``kmeans``: ``MiniBatchKMeans`` with ``n`` clusters on the features; for each centroid in turn,
  the not-yet-chosen member nearest to it.
* ``kcenter``: greedy farthest-point traversal (Gonzalez): start at the member nearest the
  mean, then repeatedly add the sample farthest from everything chosen. Its radius (largest
  distance from any pool sample to its nearest chosen sample) is within 2x of the best
  possible, so rare inputs are not left out.

Features are the model's own pooled late activations (``calib.subset.model_features``: what
matters for calibration) or, with no model, a cheap image descriptor (``descriptor_features``);
``calib.subset.sample_source`` computes them and draws the subset.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from calib.data.base import ListSource
from calib.errors import ConfigError, InputDataError
from calib.io import write_json

__all__ = ["STRATEGIES", "select", "kcenter", "kmeans_members", "radius", "Subset", "apply_subset",
           "reduce_features", "take", "pool_ids", "pool_labels"]

log = logging.getLogger(__name__)

STRATEGIES = ("random", "stratified", "kmeans", "kcenter")
SUBSET_FORMAT_VERSION = 1
Progress = Callable[[str, int, "int | None"], None]


def check_pool_size(n: int, pool: int) -> None:
    if n < 1:
        raise InputDataError(f"--n must be at least 1, got {n}")
    if n > pool:
        raise InputDataError(f"asked for {n} samples but the pool holds only {pool}",
                             hint=f"use --n {pool} or fewer (or add data)")


def kcenter(X: np.ndarray, n: int, *, start: int | None = None) -> np.ndarray:
    """Greedy farthest-point selection of ``n`` rows of ``X`` (ties go to the lowest index)."""
    X = np.asarray(X, dtype=np.float64)
    check_pool_size(n, len(X))
    if start is None:
        start = int(np.argmin(((X - X.mean(0)) ** 2).sum(1)))
    chosen = [start]
    d = ((X - X[start]) ** 2).sum(1)
    for _ in range(n - 1):
        nxt = int(np.argmax(d))
        if d[nxt] <= 0:  # only duplicates left: take the lowest unchosen index
            taken = set(chosen)
            nxt = next(i for i in range(len(X)) if i not in taken)
        chosen.append(nxt)
        d = np.minimum(d, ((X - X[nxt]) ** 2).sum(1))
    return np.asarray(chosen, dtype=np.int64)


def radius(X: np.ndarray, indices: Sequence[int], *, chunk: int = 4096) -> float:
    """Largest Euclidean distance from a row of ``X`` to its nearest selected row."""
    X = np.asarray(X, dtype=np.float64)
    C = X[np.asarray(indices, dtype=np.int64)]
    cn = (C ** 2).sum(1)
    worst = 0.0
    for s in range(0, len(X), chunk):
        B = X[s:s + chunk]
        d2 = (B ** 2).sum(1)[:, None] + cn[None, :] - 2.0 * B @ C.T
        worst = max(worst, float(np.maximum(d2.min(1), 0.0).max()))
    return float(np.sqrt(worst))


def kmeans_members(X: np.ndarray, n: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(indices, centroids): MiniBatchKMeans with ``n`` clusters; per centroid the nearest unchosen member."""
    from sklearn.cluster import MiniBatchKMeans

    X = np.asarray(X, dtype=np.float64)
    check_pool_size(n, len(X))
    km = MiniBatchKMeans(n_clusters=n, random_state=seed, n_init=3, batch_size=max(1024, 3 * n),
                         max_iter=100).fit(X)
    centers = km.cluster_centers_
    d2 = ((X ** 2).sum(1)[None, :] + (centers ** 2).sum(1)[:, None] - 2.0 * centers @ X.T)
    taken = np.zeros(len(X), dtype=bool)
    out = np.empty(n, dtype=np.int64)
    for c in range(n):
        row = np.where(taken, np.inf, d2[c])
        out[c] = int(np.argmin(row))
        taken[out[c]] = True
    return out, centers


def _stratified(labels: Sequence[int | None], n: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import train_test_split

    if any(lab is None for lab in labels):
        raise InputDataError("stratified sampling needs a label for every sample; some have none",
                             hint="use a labelled folder/manifest or another strategy")
    y = np.asarray(labels, dtype=np.int64)
    if n == len(y):
        return np.random.default_rng(seed).permutation(len(y))
    try:
        idx, _ = train_test_split(np.arange(len(y)), train_size=n, stratify=y, random_state=seed)
    except ValueError as e:
        raise InputDataError(f"stratified sampling of {n} from {len(y)} samples failed: {e}",
                             hint="every class needs at least 2 samples and --n at least the number of classes"
                             ) from None
    return np.asarray(idx, dtype=np.int64)


def select(n: int, strategy: str, *, seed: int = 0, pool_size: int | None = None,
           labels: Sequence[int | None] | None = None, features: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``n`` chosen samples (in selection order) from a pool."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown sampling strategy '{strategy}' (known: {', '.join(STRATEGIES)})")
    size = pool_size if pool_size is not None else (len(labels) if labels is not None else len(features))
    check_pool_size(n, size)
    if strategy == "random":
        return np.random.default_rng(seed).permutation(size)[:n].astype(np.int64)
    if strategy == "stratified":
        if labels is None:
            raise InputDataError("stratified sampling needs labels; this data has none",
                                 hint="use class subfolders or a manifest 'label' column, or --strategy kcenter")
        return _stratified(labels, n, seed)
    if features is None:
        raise InputDataError(f"strategy '{strategy}' needs features")
    if strategy == "kmeans":
        return kmeans_members(features, n, seed=seed)[0]
    return kcenter(features, n)  # deterministic: starts at the member nearest the mean


@dataclass
class Subset:
    """A chosen subset of a pool, saved as JSON (``subset.json``)."""

    indices: list[int]
    ids: list[str]
    strategy: str
    seed: int
    pool_size: int
    data: str = ""
    features: str = ""
    radius: float | None = None
    label_counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": "calib.subset", "version": SUBSET_FORMAT_VERSION, "data": self.data,
                "strategy": self.strategy, "seed": self.seed, "n": len(self.indices), "pool_size": self.pool_size,
                "features": self.features, "radius": self.radius, "label_counts": self.label_counts,
                "indices": [int(i) for i in self.indices], "ids": list(self.ids)}

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Subset":
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{p}: no such subset file", hint="make one with 'calib sample'") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: not a subset file ({e})") from None
        if not isinstance(d, dict) or d.get("format") != "calib.subset":
            raise ConfigError(f"{p}: not a calib subset file (no format 'calib.subset')")
        if len(d.get("indices", [])) != len(d.get("ids", [])):
            raise ConfigError(f"{p}: {len(d['indices'])} indices but {len(d['ids'])} ids")
        return cls([int(i) for i in d["indices"]], [str(i) for i in d["ids"]], d.get("strategy", ""),
                   int(d.get("seed", 0)), int(d.get("pool_size", 0)), d.get("data", ""), d.get("features", ""),
                   d.get("radius"), d.get("label_counts", {}))


def reduce_features(X: np.ndarray, dims: int = 64, *, seed: int = 0) -> np.ndarray:
    """PCA to at most ``dims`` dimensions (distances keep most of their variance; kmeans gets fast)."""
    from sklearn.decomposition import PCA

    X = np.asarray(X, dtype=np.float64)
    k = min(dims, X.shape[0], X.shape[1])
    if X.shape[1] <= dims:
        return X
    return PCA(n_components=k, random_state=seed, svd_solver="randomized").fit_transform(X)


def pool_ids(source) -> list[str]:
    if hasattr(source, "ids"):
        return list(source.ids())
    if hasattr(source, "sample_id") and hasattr(source, "indices"):
        return [source.sample_id(i) for i in source.indices]
    return [s.id for s in source]


def pool_labels(source) -> list[int | None] | None:
    labels = getattr(source, "labels", None)
    if labels is None:
        return None
    if hasattr(source, "indices") and hasattr(source, "sample_id"):  # NpzSource: labels over the whole file
        return [int(labels[i]) for i in source.indices]
    labels = list(labels)
    return None if all(lab is None for lab in labels) else labels


def take(source, indices: Sequence[int]):
    """``source`` restricted to ``indices`` (any source: uses its ``subset`` method when it has one)."""
    if hasattr(source, "subset"):
        return source.subset([int(i) for i in indices])
    samples = list(source)
    return ListSource([samples[int(i)] for i in indices], layout=getattr(source, "layout", "batch"))


def apply_subset(source, subset: Subset):
    """``source`` restricted to ``subset`` (checked: the ids must match the pool's ids)."""
    ids = pool_ids(source)
    if subset.pool_size and subset.pool_size != len(ids):
        raise InputDataError(f"the subset was drawn from a pool of {subset.pool_size} samples, this data has "
                             f"{len(ids)}", hint="sample again from this data")
    for i, sid in zip(subset.indices, subset.ids):
        if not 0 <= i < len(ids) or ids[i] != sid:
            got = ids[i] if 0 <= i < len(ids) else "nothing"
            raise InputDataError(f"subset sample {i} is '{sid}' but this data has {got} there",
                                 hint="the subset was drawn from other data; sample again")
    return take(source, subset.indices)
