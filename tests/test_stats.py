"""TensorHistogram / ActivationStats: exact against np.histogram, mergeable bit for bit, .npz round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference.histogram import reference_stats

from calib.errors import CacheFormatError, RangesError
from calib.stats import NUM_BINS, ActivationStats, TensorHistogram

F32 = np.finfo(np.float32)

# ---- data whose ranges differ wildly from batch to batch -------------------------------------------
KINDS = ("normal", "tiny", "huge", "zeros", "negative", "nonfinite", "denormal", "f32extreme", "ints", "one")


def make_batch(kind: str, seed: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        x = rng.normal(0, 1, size)
    elif kind == "tiny":
        x = rng.normal(0, 1e-20, size)
    elif kind == "huge":
        x = rng.normal(0, 1e30, size)
    elif kind == "zeros":
        x = np.zeros(size)
        x[: size // 2] = -0.0
    elif kind == "negative":
        x = -rng.exponential(3.0, size)
    elif kind == "nonfinite":
        x = rng.normal(0, 5, size)
        x[rng.random(size) < 0.3] = np.nan
        x[rng.random(size) < 0.1] = np.inf
        x[rng.random(size) < 0.1] = -np.inf
    elif kind == "denormal":
        x = rng.normal(0, 1e-40, size)  # float32 subnormals: the grid bottoms out at 2**-126
    elif kind == "f32extreme":
        x = rng.normal(0, 1, size)
        x[rng.random(size) < 0.2] = F32.min  # attention-mask style
    elif kind == "ints":
        x = rng.integers(-1000, 1000, size) * 0.25  # values on bin edges
    else:  # "one"
        x = np.full(size, 7.3)
    return x.astype(np.float32)


def fold_all(batches) -> TensorHistogram:
    h = TensorHistogram()
    for b in batches:
        h.update(b)
    return h


def assert_matches_reference(h: TensorHistogram, batches) -> None:
    ref = reference_stats(batches)
    assert h.exp == ref.exp
    assert h.n == ref.n and h.n_nonfinite == ref.n_nonfinite
    assert (h.min == ref.min or (math.isinf(h.min) and math.isinf(ref.min)))
    assert (h.max == ref.max or (math.isinf(h.max) and math.isinf(ref.max)))
    np.testing.assert_array_equal(h.pos, ref.pos)
    np.testing.assert_array_equal(h.neg, ref.neg)


@pytest.mark.parametrize("kind", KINDS)
def test_histogram_matches_np_histogram(kind):
    batches = [make_batch(kind, 1, 1000), make_batch("normal", 2, 300)]
    assert_matches_reference(fold_all(batches), batches)


def test_histogram_layout_is_32768_bins_of_power_of_two_width():
    h = fold_all([np.array([0.5, -1000.0, 3.0], np.float32)])
    assert NUM_BINS == 32768 and h.pos.shape == h.neg.shape == (NUM_BINS,)
    assert h.bin_width == 2.0 ** -5  # 1000 < 32768 / 32, 1000 >= 32768 / 64
    assert h.neg[32000] == 1 and h.pos[16] == 1 and h.pos[96] == 1
    np.testing.assert_array_equal(h.abs_counts(), h.pos + h.neg)


def test_float64_and_float16_inputs_are_binned_exactly():
    x64 = np.array([1e-300, 3.0, -2.5, 1e300], np.float64)
    assert_matches_reference(fold_all([x64]), [x64])
    x16 = np.array([0.1, -65504, 3], np.float16)
    assert_matches_reference(fold_all([x16]), [x16.astype(np.float32)])


# ---- the merge property ---------------------------------------------------------------------------
@st.composite
def sharded_data(draw):
    n_batches = draw(st.integers(1, 7))
    batches = [make_batch(draw(st.sampled_from(KINDS)), draw(st.integers(0, 10_000)), draw(st.integers(0, 60)))
               for _ in range(n_batches)]
    values = np.concatenate(batches)
    n_shards = draw(st.integers(1, 4))
    # each value goes to a shard; within a shard, values are re-split into random batches
    shard_of = np.array(draw(st.lists(st.integers(0, n_shards - 1), min_size=values.size, max_size=values.size)),
                        dtype=np.int64)
    shards = []
    for s in range(n_shards):
        v = values[shard_of == s]
        cuts = sorted(draw(st.lists(st.integers(0, v.size), max_size=4)))
        shards.append(np.split(v, cuts))
    order = draw(st.permutations(range(n_shards)))
    return batches, shards, order


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(sharded_data())
def test_merge_of_shards_equals_one_pass_bit_for_bit(data):
    batches, shards, order = data
    one_pass = fold_all(batches)
    assert_matches_reference(one_pass, batches)
    parts = [fold_all(shards[i]) for i in order]
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    assert merged.equals(one_pass)
    # the other association, and merging into an empty histogram, give the same
    right = TensorHistogram()
    for p in reversed(parts):
        right = p.merge(right)
    assert right.equals(one_pass)


def test_merge_is_pure():
    a, b = fold_all([make_batch("normal", 0, 100)]), fold_all([make_batch("huge", 1, 100)])
    a_pos, b_pos = a.pos.copy(), b.pos.copy()
    a.merge(b)
    np.testing.assert_array_equal(a.pos, a_pos)
    np.testing.assert_array_equal(b.pos, b_pos)


# ---- ActivationStats -------------------------------------------------------------------------------
def _stats(tensor_batches: dict[str, list[np.ndarray]], ids: list[str]) -> ActivationStats:
    s = ActivationStats({k: fold_all(v) for k, v in tensor_batches.items()}, model_sha256="ab" * 32,
                        meta={"inputs": ["x"]})
    s.add_samples(ids)
    return s


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**31), st.integers(1, 12), st.data())
def test_activation_stats_merge_and_npz_round_trip(tmp_path_factory, seed, n_samples, data):
    rng = np.random.default_rng(seed)
    kinds = {"t_normal": "normal", "t_mask": "f32extreme", "t_nan": "nonfinite", "t_zero": "zeros",
             "t_neg": "negative", "t_tiny": "tiny"}
    per_sample = {t: [make_batch(k, int(rng.integers(1 << 30)), int(rng.integers(0, 20))) for _ in range(n_samples)]
                  for t, k in kinds.items()}
    ids = [f"data.npz[{i}]" for i in range(n_samples)]
    whole = _stats(per_sample, ids)
    cut = data.draw(st.integers(0, n_samples))
    perm = data.draw(st.permutations(range(n_samples)))
    a_idx, b_idx = perm[:cut], perm[cut:]
    a = _stats({t: [v[i] for i in a_idx] for t, v in per_sample.items()}, [ids[i] for i in a_idx])
    b = _stats({t: [v[i] for i in b_idx] for t, v in per_sample.items()}, [ids[i] for i in b_idx])
    merged = b.merge(a) if data.draw(st.booleans()) else a.merge(b)
    assert merged.equals(whole)
    assert merged.n_samples == n_samples and merged.sample_digest == whole.sample_digest
    path = tmp_path_factory.mktemp("stats") / "stats.npz"
    merged.save(path)
    loaded = ActivationStats.load(path)
    assert loaded.equals(whole)
    for key, arr in whole.to_arrays().items():
        got = loaded.to_arrays()[key]
        assert got.dtype == arr.dtype and got.shape == arr.shape, key
        np.testing.assert_array_equal(got, arr, err_msg=key)
    assert loaded.meta == whole.meta


def test_merge_refuses_other_models_and_tensor_sets():
    a = _stats({"t": [np.ones(3, np.float32)]}, ["0"])
    b = _stats({"u": [np.ones(3, np.float32)]}, ["1"])
    with pytest.raises(RangesError, match="different tensors"):
        a.merge(b)
    c = _stats({"t": [np.ones(3, np.float32)]}, ["2"])
    c.model_sha256 = "cd" * 32
    with pytest.raises(RangesError, match="different models"):
        a.merge(c)


def test_load_refuses_other_files(tmp_path):
    with pytest.raises(CacheFormatError, match="no such statistics file"):
        ActivationStats.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(CacheFormatError, match="not a calib statistics file"):
        ActivationStats.load(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CacheFormatError, match="not a calib statistics file"):
        ActivationStats.load(tmp_path / "junk.npz")
    s = _stats({"t": [np.ones(3, np.float32)]}, ["0"])
    arrays = s.to_arrays()
    arrays["header"] = np.array(str(arrays["header"]).replace('"version": 2', '"version": 99'))
    np.savez(tmp_path / "future.npz", **arrays)
    with pytest.raises(CacheFormatError, match="format version 99"):
        ActivationStats.load(tmp_path / "future.npz")


def test_version_1_files_with_2048_bins_are_refused_in_one_line(tmp_path, capsys):
    # what calib before the 32,768-bin grid wrote: version 1, 2048 bins per sign
    arrays = _stats({"t": [np.ones(3, np.float32)]}, ["0"]).to_arrays()
    arrays["header"] = np.array(str(arrays["header"]).replace('"version": 2', '"version": 1')
                                .replace('"num_bins": 32768', '"num_bins": 2048'))
    arrays["pos"], arrays["neg"] = arrays["pos"][:, :2048], arrays["neg"][:, :2048]
    np.savez(tmp_path / "old.npz", **arrays)
    with pytest.raises(CacheFormatError, match="format version 1, this calib reads version 2"):
        ActivationStats.load(tmp_path / "old.npz")
    from calib.cli import main

    assert main(["calibrate", str(tmp_path / "old.npz"), "--output", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()  # the error, then the CLI's usual hint line
    assert "version 1, this calib reads version 2" in lines[0] and lines[1:] == ["hint: collect the statistics again"]


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "nonfinite"])
def test_fast_path_equals_value_by_value_path(kind):
    # a batch without NaN/inf is binned at once after growing the grid; one NaN sends the same
    # values through the value-by-value kernel: both must give the same histogram
    x = np.concatenate([make_batch("tiny", 3, 50), make_batch(kind, 4, 500)])
    fast = fold_all([x])
    slow = fold_all([np.append(x, np.float32(np.nan))])
    assert (fast.exp, fast.min, fast.max) == (slow.exp, slow.min, slow.max)
    np.testing.assert_array_equal(fast.pos, slow.pos)
    np.testing.assert_array_equal(fast.neg, slow.neg)
    assert slow.n_nonfinite == 1 and fast.n_nonfinite == 0


def test_counts_are_int32_until_2_31_values_then_int64():
    x = np.random.default_rng(5).normal(size=5000).astype(np.float32)
    small = fold_all([x])
    assert small.pos.dtype == small.neg.dtype == np.int32 and small.pos.nbytes == NUM_BINS * 4
    big = fold_all([x])
    big.n = 2 ** 31 - 10  # as if it had seen that many values: the next batch must widen the counts first
    big.update(x[:100])
    assert big.pos.dtype == big.neg.dtype == np.int64
    np.testing.assert_array_equal(big.pos, fold_all([x, x[:100]]).pos)
    merged = small.merge(big)
    assert merged.pos.dtype == np.int64 and merged.n == small.n + big.n
    np.testing.assert_array_equal(merged.abs_counts(), small.abs_counts() + big.abs_counts())
    half = fold_all([x])
    half.n = 2 ** 30 - 1  # twice that is still below 2**31 - 1
    assert half.merge(half).pos.dtype == np.int32 and fold_all([x]).merge(small).equals(fold_all([x, x]))
