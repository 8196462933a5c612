"""Calibrators against slow references (tests/reference/calibrators.py) and the calibrator contract."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
from reference import calibrators as ref
from reference.linear_hist import rebin_linear_ref

from calib.calibrate import (
    FALLBACK_AMAX,
    METHODS,
    Entropy,
    MinMax,
    Mse,
    Percentile,
    calibrate,
    calibrate_all,
    load_ranges,
    parse_method,
    save_ranges,
)
from calib.calibrate.entropy import entropy_divergences
from calib.calibrate.mse import mse_costs
from calib.errors import CacheFormatError, RangesError
from calib.stats import LINEAR_BINS, MIN_EXP, NUM_BINS, ActivationStats, TensorHistogram

F32_MIN = float(np.finfo(np.float32).min)


# ---- the histograms ------------------------------------------------------------------------------
def _raw_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20261126)
    n = 20_000
    c = {}
    c["normal"] = rng.normal(0, 1, n)
    c["laplace"] = rng.laplace(0, 1, n)
    c["cauchy_heavy_tail"] = rng.standard_cauchy(n)
    c["bimodal"] = np.concatenate([rng.normal(-5, 0.5, n // 2), rng.normal(5, 0.5, n // 2)])
    c["spike_at_zero"] = np.where(rng.random(n) < 0.9, 0.0, rng.normal(0, 2, n))
    c["relu_normal"] = np.maximum(rng.normal(0.3, 1, n), 0)
    c["one_outlier"] = np.append(rng.normal(0, 1, n - 1), 1e4)
    c["negative_only"] = -rng.exponential(2.0, n)
    c["tiny_count"] = rng.normal(0, 1, 5)
    c["uniform"] = rng.uniform(-3, 3, n)
    c["lognormal"] = rng.lognormal(0, 1.5, n)
    c["on_bin_edges"] = rng.integers(-2047, 2048, n) * 2.0 ** -4
    c["huge_scale"] = rng.normal(0, 1e30, n)
    c["tiny_scale"] = rng.normal(0, 1e-30, n)
    c["f32_min_mask"] = np.where(rng.random(n) < 0.25, F32_MIN, rng.normal(0, 3, n))
    c["two_scales"] = np.where(rng.random(n) < 0.999, rng.normal(0, 1e-3, n), rng.normal(0, 1e3, n))
    c["softmax_like"] = rng.dirichlet(np.ones(16) * 0.3, n // 16).reshape(-1)
    c["discrete_levels"] = rng.integers(-30, 31, n) * 0.1
    c["constant"] = np.full(n, 3.0)
    c["single_value"] = np.array([-0.37])
    c["mixed_nonfinite"] = np.where(rng.random(n) < 0.2, np.nan, rng.normal(0, 1, n))
    return {k: v.astype(np.float32) for k, v in c.items()}


def _count_cases() -> dict[str, tuple[np.ndarray, int]]:
    """Hand-made |x| histograms of 2048 bins (counts, exponent): shapes collection rarely produces.
    The search kernels run on them as they are; as calib histograms they are padded to NUM_BINS."""
    rng = np.random.default_rng(7)
    c = {}
    NUM_BINS = LINEAR_BINS  # noqa: N806 (the shapes below were written for 2048 bins)

    def hist(**bins) -> np.ndarray:
        a = np.zeros(NUM_BINS, np.int64)
        for k, v in bins.items():
            a[int(k[1:])] = v
        return a

    c["single_bin"] = (hist(b1500=1000), -8)
    c["first_two_bins"] = (hist(b0=5, b1=3), -3)
    a = np.zeros(NUM_BINS, np.int64)
    a[rng.choice(NUM_BINS, 5, replace=False)] = 1
    c["five_ones"] = (a, 0)
    c["random_small_counts"] = (rng.integers(0, 5, NUM_BINS).astype(np.int64), -2)
    a = hist(b2047=1)
    a[:300] = rng.poisson(50 * np.exp(-np.arange(300) / 40))
    c["gap_then_outlier"] = (a, -6)
    a = np.zeros(NUM_BINS, np.int64)
    a[:300] = rng.integers(0, 1000, 300)
    c["n_300"] = (a, 1)
    a = np.zeros(NUM_BINS, np.int64)
    a[:200] = 1
    c["flat_200"] = (a, -1)
    c["two_spikes"] = (hist(b3=10**6, b900=10**6), -5)
    a = np.zeros(NUM_BINS, np.int64)
    a[:1200] = (1e9 * np.exp(-np.arange(1200) / 150)).astype(np.int64)
    c["large_counts"] = (a, -7)
    c["just_past_128"] = (hist(b129=4, b127=1), 0)
    return c


RAW = _raw_cases()
COUNTS = _count_cases()


def hist_from_raw(x: np.ndarray, batch: int = 997) -> TensorHistogram:
    h = TensorHistogram()
    for i in range(0, max(x.size, 1), batch):
        h.update(x[i:i + batch])
    return h


def hist_from_counts(counts: np.ndarray, exp: int) -> TensorHistogram:
    w = 2.0 ** exp
    last = int(np.flatnonzero(counts)[-1])
    top = (last + 0.75) * w  # the largest value lies inside the last non-empty bin
    pos = np.zeros(NUM_BINS, np.int64)
    pos[:counts.size] = counts
    return TensorHistogram(pos=pos, neg=np.zeros(NUM_BINS, np.int64), exp=exp, min=0.0, max=top,
                           n=int(counts.sum()), n_nonfinite=0)


@functools.lru_cache(maxsize=None)
def case(name: str) -> TensorHistogram:
    return hist_from_raw(RAW[name]) if name in RAW else hist_from_counts(*COUNTS[name])


NONDEGENERATE = [k for k in RAW if k not in ("constant", "single_value")] + list(COUNTS)
ALL_HISTS = list(RAW) + list(COUNTS)


@functools.lru_cache(maxsize=None)
def linear_reference(name: str) -> tuple[np.ndarray, float]:
    """The 2048 linear bins over [0, max|x|] the searches run on, re-binned by the slow reference."""
    h = case(name)
    return rebin_linear_ref(h.abs_counts(), h.bin_width, h.max_abs)


@functools.lru_cache(maxsize=None)
def kernel_counts(name: str) -> np.ndarray:
    """Counts fed to the search kernels directly: the hand-made 2048 bins, or the reference re-binning."""
    return COUNTS[name][0] if name in COUNTS else linear_reference(name)[0]


@functools.lru_cache(maxsize=None)
def entropy_reference(name: str) -> dict:
    h = case(name)
    counts, width = linear_reference(name)
    return ref.entropy_ref(counts, width, h.max_abs)


@functools.lru_cache(maxsize=None)
def mse_reference(name: str) -> dict:
    h = case(name)
    counts, width = linear_reference(name)
    return ref.mse_ref(counts, width, h.max_abs)


def test_linear_rebinning_matches_the_slow_reference():
    for name in ALL_HISTS:
        h = case(name)
        if h.max_abs == 0:
            continue
        counts, width = h.linear_abs_counts()
        want, want_width = linear_reference(name)
        assert width == want_width, name
        np.testing.assert_allclose(counts, want, rtol=1e-9, atol=1e-6 * max(1.0, h.n_finite), err_msg=name)
        assert counts.sum() == pytest.approx(h.n_finite, rel=1e-12), name


def chosen_candidate(amax: float, h: TensorHistogram, candidates) -> int:
    """The candidate (in linear bins) whose clipped amax is ``amax`` (the largest one if several clip alike)."""
    width = h.max_abs / LINEAR_BINS
    hits = [int(k) for k in candidates if min(int(k) * width, h.max_abs) == amax]
    assert hits, f"amax {amax} is not a candidate"
    return hits[-1]


def test_there_are_at_least_20_histograms_per_calibrator():
    assert len(ALL_HISTS) >= 20 and len(NONDEGENERATE) >= 20


# ---- entropy -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_HISTS)
def test_entropy_matches_pytorch_quantization_loop(name):
    h = case(name)
    r = entropy_reference(name)
    ours = Entropy().amax(h)
    if r["kl"] is None:
        assert ours == r["amax"]
        return
    if ours != r["amax"]:
        # Several thresholds can have the same divergence up to float rounding (e.g. where the
        # histogram is empty, moving the threshold changes nothing but the rounding of the sums).
        # The fast code evaluates KL from prefix sums, so which of those near-ties is "last" may
        # differ; the choice is right if the reference's own KL there equals its minimum.
        i = chosen_candidate(ours, h, r["candidates"])
        kl_at = r["kl"][list(r["candidates"]).index(i)]
        best = r["kl"].min()
        assert kl_at <= best + 1e-9 * max(abs(best), 1e-300), (name, ours, r["amax"], kl_at, best)


@pytest.mark.parametrize("name", [n for n in ALL_HISTS if ref.last_nonempty(kernel_counts(n)) > 128])
def test_entropy_divergence_curve_matches_scipy(name):
    counts = kernel_counts(name)
    cand_ref, kl_ref = ref.entropy_divergences_ref(counts)
    r = {"candidates": cand_ref, "kl": kl_ref}
    cand, kl = entropy_divergences(counts)
    np.testing.assert_array_equal(cand, r["candidates"])
    finite = np.isfinite(r["kl"])
    np.testing.assert_array_equal(np.isfinite(kl), finite)
    np.testing.assert_allclose(kl[finite], r["kl"][finite], rtol=1e-7, atol=1e-12)


def test_entropy_does_not_touch_the_histogram():
    h = case("spike_at_zero")
    before = h.abs_counts().copy()
    Entropy().amax(h)
    np.testing.assert_array_equal(h.abs_counts(), before)


# ---- mse -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_HISTS)
def test_mse_matches_brute_force_integration(name):
    h = case(name)
    r = mse_reference(name)
    ours = Mse().amax(h)
    if r["costs"] is None:
        assert ours == r["amax"]
        return
    k = chosen_candidate(ours, h, range(1, len(r["costs"]) + 1))
    best = r["costs"].min()
    assert r["costs"][k - 1] <= best * (1 + 1e-9), (name, ours, r["amax"])


@pytest.mark.parametrize("name", ["normal", "spike_at_zero", "n_300", "first_two_bins", "one_outlier"])
def test_mse_cost_curve_matches_brute_force(name):
    counts = kernel_counts(name)
    r = ref.mse_ref(counts, 1.0, float(ref.last_nonempty(counts)))
    cand, costs = mse_costs(counts)
    assert len(cand) == len(r["costs"])
    np.testing.assert_allclose(costs, r["costs"], rtol=1e-9)


# ---- percentile ----------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [99.99, 99.9, 99.0, 50.0, 100.0, 0.001])
@pytest.mark.parametrize("name", ALL_HISTS)
def test_percentile_matches_exact_cdf(name, p):
    h = case(name)
    assert Percentile(p).amax(h) == ref.percentile_ref(h.abs_counts(), h.bin_width, h.max_abs, p)


@pytest.mark.parametrize("p,total", [(99.99, 10_000), (99.9, 1000), (99.9, 33_000), (12.345, 20_000), (99.0, 300)])
def test_percentile_exact_at_the_boundary(p, total):
    # exactly p % of the values in bin 0, the rest far out: p % is reached at bin 0. In floats,
    # p / 100 * total can land a hair above the integer (99.9 % of 1000 -> 999.0000000000001) and
    # would demand one more value, i.e. the outlier.
    counts = np.zeros(NUM_BINS, np.int64)
    inside = int(round(p * total / 100))
    counts[0], counts[1500] = inside, total - inside
    h = hist_from_counts(counts, -4)
    assert Percentile(p).amax(h) == h.bin_width == ref.percentile_ref(counts, h.bin_width, h.max_abs, p)


# ---- minmax --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(RAW))
def test_minmax_is_max_abs_of_the_raw_data(name):
    assert MinMax().amax(case(name)) == ref.minmax_ref(RAW[name])


# ---- the contract every method keeps -------------------------------------------------------------
METHOD_OBJECTS = [cls() for cls in METHODS.values()] + [Percentile(99.9), Percentile(50.0)]
DEGENERATE = {
    "all_zeros": np.zeros(100, np.float32),
    "negative_zeros": np.full(10, -0.0, np.float32),
    "constant": np.full(100, -2.5, np.float32),
    "one_value": np.array([1e-3], np.float32),
    "only_nonfinite": np.array([np.nan, np.inf, -np.inf], np.float32),
    "subnormal": np.array([1e-45, -1e-44], np.float32),
}


def _stats_of(arrays: dict[str, np.ndarray], batch: int = 997) -> ActivationStats:
    return ActivationStats({k: hist_from_raw(v, batch) for k, v in arrays.items()}, model_sha256="0" * 64)


@pytest.fixture(scope="module")
def contract_stats():
    data = dict(RAW) | DEGENERATE
    return data, _stats_of(data)


@pytest.mark.parametrize("method", METHOD_OBJECTS, ids=lambda m: m.label)
def test_contract_positive_finite_and_within_data(method, contract_stats):
    data, stats = contract_stats
    ranges = calibrate(stats, method)
    assert set(ranges) == set(data)
    for name, r in ranges.items():
        assert math.isfinite(r.amax) and r.amax > 0, name
        assert math.isfinite(r.scale) and r.scale > 0 and r.scale == r.amax / 127, name
        assert np.float32(r.scale) >= np.finfo(np.float32).tiny, name  # never a zero/denormal float32 scale
        max_abs = ref.minmax_ref(data[name])
        if 0 < max_abs < 127 * np.finfo(np.float32).tiny:  # denormal data: floored, and said so
            assert r.amax == 127 * float(np.finfo(np.float32).tiny) and "floored" in r.degenerate, name
        elif max_abs > 0:
            assert r.amax <= max_abs, name
            assert r.degenerate is None or "gave 0" in r.degenerate, name
        else:
            assert r.amax == FALLBACK_AMAX and r.degenerate, name


@pytest.mark.parametrize("method", METHOD_OBJECTS, ids=lambda m: m.label)
def test_contract_deterministic_across_batch_splits(method, contract_stats):
    data, stats = contract_stats
    again = _stats_of(data, batch=113)
    assert calibrate(stats, method).amax() == calibrate(again, method).amax() == calibrate(stats, method).amax()


@pytest.mark.parametrize("method", METHOD_OBJECTS, ids=lambda m: m.label)
def test_contract_doubling_the_data_doubles_amax(method):
    # exact for every tensor whose grid is above the 2**-126 floor (below it the grid cannot shift);
    # doubled in float64 so that float32 extremes (attention masks) do not overflow
    names = [k for k in RAW if case(k).exp > MIN_EXP and case(k).n_finite > 0]
    assert len(names) >= 18
    base = calibrate(_stats_of({k: RAW[k].astype(np.float64) for k in names}), method)
    doubled = calibrate(_stats_of({k: RAW[k].astype(np.float64) * 2 for k in names}), method)
    for k in names:
        assert doubled[k].amax == 2 * base[k].amax, k


def test_degenerate_tensors_say_why(contract_stats):
    _, stats = contract_stats
    r = calibrate(stats, "entropy")
    assert "NaN/inf" in r["only_nonfinite"].degenerate
    assert "zero" in r["all_zeros"].degenerate
    assert r["constant"].amax == 2.5 and r["one_value"].amax == np.float32(1e-3)


def test_empty_histogram_is_degenerate():
    stats = ActivationStats({"t": TensorHistogram()})
    r = calibrate(stats, "mse")["t"]
    assert r.amax == FALLBACK_AMAX and "no values" in r.degenerate


# ---- methods by name, ranges.json ----------------------------------------------------------------
def test_parse_method():
    assert parse_method("entropy") == Entropy()
    assert parse_method("percentile:99.9") == Percentile(99.9)
    assert parse_method("percentile").p == 99.99
    assert parse_method(" mse ") == Mse()
    with pytest.raises(RangesError, match="unknown calibration method 'entropi'") as e:
        parse_method("entropi")
    assert "entropy" in e.value.hint
    with pytest.raises(RangesError, match="must be a number"):
        parse_method("percentile:high")
    with pytest.raises(RangesError, match=r"percentile must be in \(0, 100\]"):
        parse_method("percentile:120")
    with pytest.raises(RangesError, match="takes no parameter"):
        parse_method("minmax:3")


def test_ranges_json_round_trip(tmp_path, contract_stats):
    _, stats = contract_stats
    ranges = calibrate_all(stats, ["minmax", "percentile", "percentile:99.9", "entropy", "mse"])
    assert list(ranges) == ["minmax", "percentile", "percentile:99.9", "entropy", "mse"]
    path = save_ranges(tmp_path / "ranges.json", ranges, stats=stats)
    doc = json.loads(path.read_text())
    for label, r in ranges.items():
        for t, tr in r.items():
            entry = doc["methods"][label][t]
            assert entry["amax"] == tr.amax and entry["scale"] == tr.amax / 127
    back = load_ranges(path)
    assert {k: v.amax() for k, v in back.items()} == {k: v.amax() for k, v in ranges.items()}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CacheFormatError, match="not valid JSON"):
        load_ranges(tmp_path / "bad.json")
