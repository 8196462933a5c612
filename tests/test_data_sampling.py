"""Sampling strategies against independent expectations (tests/reference/sampling_ref.py)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from calib.data.base import ListSource, Sample
from calib.data.sampling import Subset, apply_subset, kcenter, kmeans_members, radius, select
from calib.subset import sample_source
from calib.errors import InputDataError
from tests.reference.sampling_ref import covering_radius, nearest_unchosen_per_centre


def _planted(seed: int = 0):
    """400 points in a big Gaussian blob plus a rare cluster of 4 far away."""
    rng = np.random.default_rng(seed)
    common = rng.normal(0, 1, (400, 5))
    rare = rng.normal(0, 0.1, (4, 5)) + 12.0
    return np.concatenate([common, rare]), set(range(400, 404))


@pytest.mark.parametrize("n", [7, 20, 33])
def test_stratified_keeps_proportions_within_one(n):
    rng = np.random.default_rng(n)
    labels = rng.choice(4, size=300, p=[0.5, 0.3, 0.15, 0.05]).tolist()
    idx = select(n, "stratified", seed=3, labels=labels)
    assert len(idx) == n and len(set(idx.tolist())) == n
    got = Counter(labels[i] for i in idx)
    pool = Counter(labels)
    for c in pool:
        expected = n * pool[c] / len(labels)
        assert abs(got.get(c, 0) - expected) <= 1.0, (c, got, expected)


def test_kcenter_includes_rare_cluster_and_beats_random():
    X, rare = _planted()
    idx = kcenter(X, 10)
    assert rare & set(idx.tolist()), "k-center left out the rare cluster"
    r_kc = covering_radius(X.tolist(), idx.tolist())
    assert radius(X, idx) == pytest.approx(r_kc, rel=1e-9)
    for seed in range(10):
        ridx = select(10, "random", seed=seed, pool_size=len(X))
        assert r_kc <= covering_radius(X.tolist(), ridx.tolist()) + 1e-12


def test_kcenter_is_greedy_farthest_point():
    X = np.random.default_rng(1).normal(size=(60, 3))
    idx = kcenter(X, 6).tolist()
    for k in range(1, 6):  # each pick is the row farthest from those chosen before it
        d = [min(math.dist(X[i], X[j]) for j in idx[:k]) for i in range(len(X))]
        assert d[idx[k]] == pytest.approx(max(d))


def test_kmeans_picks_members_nearest_centroids():
    X = np.random.default_rng(2).normal(size=(150, 4))
    idx, centres = kmeans_members(X, 12, seed=5)
    assert idx.tolist() == nearest_unchosen_per_centre(X.tolist(), centres.tolist())
    assert len(set(idx.tolist())) == 12


@pytest.mark.parametrize("strategy", ["random", "stratified", "kmeans", "kcenter"])
def test_deterministic_with_seed(strategy):
    X = np.random.default_rng(4).normal(size=(120, 6))
    labels = (np.arange(120) % 3).tolist()
    a = select(15, strategy, seed=11, labels=labels, features=X)
    b = select(15, strategy, seed=11, labels=labels, features=X)
    assert a.tolist() == b.tolist()
    if strategy in ("random", "stratified"):
        assert select(15, strategy, seed=12, labels=labels, features=X).tolist() != a.tolist()


def test_n_larger_than_pool_is_a_clear_error():
    with pytest.raises(InputDataError, match="asked for 11 samples but the pool holds only 10"):
        select(11, "random", pool_size=10)


def test_stratified_without_labels_is_refused():
    with pytest.raises(InputDataError, match="needs labels"):
        select(3, "stratified", pool_size=10)


def test_subset_round_trip_and_id_check(tmp_path):
    samples = [Sample(f"s{i}", {"x": np.full((2,), float(i), np.float32)}, i % 2) for i in range(30)]
    src = ListSource(samples)
    sub = sample_source(src, 6, "kcenter", seed=0)
    sub.save(tmp_path / "subset.json")
    back = Subset.load(tmp_path / "subset.json")
    assert back.indices == sub.indices and back.ids == [f"s{i}" for i in sub.indices]
    assert [s.id for s in apply_subset(src, back)] == back.ids
    other = ListSource([Sample(f"t{i}", s.feeds, s.label) for i, s in enumerate(samples)])
    with pytest.raises(InputDataError, match="is .s0. but this data has|but this data has"):
        apply_subset(other, back)
