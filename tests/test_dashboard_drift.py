"""calib.drift against slow, obvious references (numpy binning of the raw values, scipy's JS distance)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from calib.calibrate.base import TensorRange
from calib.drift import (
    Embedding,
    histogram_view,
    js_distance,
    layer_deltas,
    novelty,
    range_rows,
    rebin,
    tensor_drift,
    worst_layers,
)
from calib.errors import RangesError
from calib.stats import NUM_BINS, ActivationStats, TensorHistogram, width_exponent


def _hist(x: np.ndarray, batches: int = 3) -> TensorHistogram:
    h = TensorHistogram()
    for part in np.array_split(x, batches):
        h.update(part)
    return h


def _signed_reference(x: np.ndarray, exp: int) -> np.ndarray:
    """Signed histogram of raw values at width 2**exp: [neg bins far..near 0, pos bins near..far]."""
    w = 2.0 ** exp
    k = np.floor(np.abs(x.astype(np.float64)) / w).astype(np.int64)
    pos = np.bincount(k[x >= 0], minlength=NUM_BINS)[:NUM_BINS]
    neg = np.bincount(k[x < 0], minlength=NUM_BINS)[:NUM_BINS]
    return np.concatenate([neg[::-1], pos])


def _exp_of(*xs: np.ndarray, bins: int = 64) -> int:
    """The comparison width, found the slow way: the finest power of two >= both collection widths
    at which the largest |x| falls in one of the first ``bins`` bins."""
    e = max(width_exponent(float(np.abs(x).max())) for x in xs)
    m = max(float(np.abs(x).max()) for x in xs)
    while math.floor(m / 2.0 ** e) >= bins:
        e += 1
    return e


@pytest.mark.parametrize("scale_b", [1.0, 3.0, 0.01])
def test_js_distance_matches_scipy_on_raw_values(scale_b):
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, 20000).astype(np.float32)
    b = (rng.laplace(0.3, 1.0, 15000) * scale_b).astype(np.float32)
    e = _exp_of(a, b)
    ref = jensenshannon(_signed_reference(a, e), _signed_reference(b, e), base=2)
    got = js_distance(_hist(a), _hist(b))
    assert got == pytest.approx(ref, abs=1e-12)
    assert js_distance(_hist(b), _hist(a)) == pytest.approx(got, abs=1e-15)


def test_js_distance_bounds():
    rng = np.random.default_rng(1)
    a = rng.uniform(0.5, 1.0, 1000).astype(np.float32)
    assert js_distance(_hist(a), _hist(a.copy(), batches=7)) == 0.0
    assert js_distance(_hist(a), _hist(-a)) == pytest.approx(1.0)  # disjoint: positive vs negative
    big = rng.uniform(-1, 1, 200000).astype(np.float32)
    assert js_distance(_hist(big[:100000]), _hist(big[100000:])) < 0.05  # same distribution: near 0 (sampling noise only)
    assert math.isnan(js_distance(_hist(a), TensorHistogram()))


def test_rebin_equals_binning_at_the_coarse_width():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 0.01, 5000).astype(np.float32)
    h = _hist(x)
    p, q = rebin(h, h.exp + 5)
    ref = _signed_reference(x, h.exp + 5)
    assert np.array_equal(np.concatenate([q[::-1], p]), ref)
    with pytest.raises(RangesError):
        rebin(h, h.exp - 1)


def test_histogram_view_keeps_every_value_and_centres_them():
    rng = np.random.default_rng(3)
    x = rng.normal(-0.5, 2.0, 30000).astype(np.float32)
    h = _hist(x)
    centres, counts, w = histogram_view(h, max_bins=100)
    assert counts.sum() == x.size
    assert len(counts) <= 101
    # the mean of the binned values is within half a bin of the true mean
    assert abs(float((centres * counts).sum() / counts.sum()) - float(x.mean())) <= w / 2


def _stats(tensors: dict[str, np.ndarray]) -> ActivationStats:
    return ActivationStats({k: _hist(v) for k, v in tensors.items()}, "sha", 1)


def test_tensor_drift_clip_rate_matches_counting_raw_values():
    rng = np.random.default_rng(4)
    calib = {"t0": rng.normal(0, 1, 8000).astype(np.float32), "t1": rng.uniform(-2, 2, 8000).astype(np.float32)}
    ev = {"t0": rng.normal(0, 1.6, 6000).astype(np.float32), "t1": rng.uniform(-2, 2, 6000).astype(np.float32)}
    amax = {"t0": 2.5, "t1": 1.75}  # both on the bin grid of the eval histograms: exact clip counts
    ranges = {"m": {t: TensorRange(a, "m") for t, a in amax.items()}}
    rows = {d.tensor: d for d in tensor_drift(_stats(calib), _stats(ev), ranges)}
    for t, a in amax.items():
        assert rows[t].clip_rate["m"] == pytest.approx(float((np.abs(ev[t]) > a).mean()), abs=1e-12)
        e = _exp_of(calib[t], ev[t])
        ref = jensenshannon(_signed_reference(calib[t], e), _signed_reference(ev[t], e), base=2)
        assert rows[t].js_distance == pytest.approx(ref, abs=1e-12)
    assert rows["t0"].js_distance > rows["t1"].js_distance  # the wider eval distribution drifted


def test_tensor_drift_refuses_stats_of_other_models():
    a = _stats({"t": np.ones(4, np.float32)})
    b = ActivationStats({"t": _hist(np.ones(4, np.float32))}, "other", 1)
    with pytest.raises(RangesError, match="different models"):
        tensor_drift(a, b, {})


def test_novelty_matches_brute_force():
    rng = np.random.default_rng(5)
    c = rng.normal(0, 1, (30, 6))
    e = np.vstack([rng.normal(0, 1, (5, 6)), rng.normal(6, 1, (2, 6))])
    cal = Embedding([f"c{i}" for i in range(30)], c, "t")
    ev = Embedding([f"e{i}" for i in range(7)], e, "t", [0, 1, 0, 1, 0, 1, 0])
    nov = novelty(cal, ev)
    mu, sd = c.mean(0), c.std(0)
    cz, ez = (c - mu) / sd, (e - mu) / sd
    nn_c = [min(np.linalg.norm(cz[i] - cz[j]) for j in range(30) if j != i) for i in range(30)]
    scale = float(np.median(nn_c))
    ref = {f"e{i}": min(np.linalg.norm(ez[i] - cz[j]) for j in range(30)) / scale for i in range(7)}
    assert nov.scale == pytest.approx(scale)
    assert {i: float(s) for i, s in zip(nov.ids, nov.score)} == pytest.approx(ref)
    assert set(nov.ids[:2]) == {"e5", "e6"}  # the shifted samples come first
    assert list(nov.score) == sorted(nov.score, reverse=True)


def test_worst_layers_and_range_rows():
    rows = [{"t": "a", "sqnr_db": 30.0, "relative_error": 0.01}, {"t": "b", "sqnr_db": float("nan"),
                                                                   "relative_error": float("nan")},
            {"t": "c", "sqnr_db": 5.0, "relative_error": 0.4}, {"t": "d", "sqnr_db": 12.0, "relative_error": 0.2}]
    assert [r["t"] for r in worst_layers(rows, "sqnr_db", 3)] == ["c", "d", "a"]
    assert [r["t"] for r in worst_layers(rows, "relative_error", 2)] == ["c", "d"]
    a = {"x": TensorRange(2.0, "m"), "y": TensorRange(1.0, "m")}
    b = {"x": TensorRange(3.0, "m"), "z": TensorRange(1.0, "m")}
    got = {r["tensor"]: r for r in range_rows(a, b)}
    assert got["x"]["ratio_b_a"] == 1.5 and got["x"]["change"] == 0.5
    assert math.isnan(got["y"]["amax_b"]) and math.isnan(got["z"]["ratio_b_a"])
    ra = [{"fp32_tensor": "p", "node": "n1", "op_type": "Conv", "depth": 1, "sqnr_db": 10.0},
          {"fp32_tensor": "q", "node": "n2", "op_type": "Relu", "depth": 2, "sqnr_db": float("inf")},
          {"fp32_tensor": "r", "node": "n3", "op_type": "Add", "depth": 3, "sqnr_db": 7.0}]
    rb = [dict(ra[2], sqnr_db=9.5), dict(ra[0], sqnr_db=8.0), dict(ra[1])]
    assert [(d["fp32_tensor"], d["delta"]) for d in layer_deltas(ra, rb)] == [("p", -2.0), ("r", 2.5)]
