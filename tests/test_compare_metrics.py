"""Streaming metrics against slow references and Polygraphy; targets and user metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calib.compare.metrics import TaskAccumulator, TensorAccumulator, safe_float, unsafe_float
from calib.compare.targets import OutputMetrics, UserMetric, load_metric, parse_target
from calib.errors import ConfigError
from reference import metrics as ref


def _pairs(seed: int, n_batches: int = 3, batch: int = 5, shape=(4, 6)):
    rng = np.random.default_rng(seed)
    fa, qa = [], []
    for _ in range(n_batches):
        a = rng.normal(size=(batch, *shape)).astype(np.float32)
        b = (a + rng.normal(scale=0.05, size=a.shape)).astype(np.float32)
        fa.append(a)
        qa.append(b)
    return fa, qa


def _fold(fa, qa) -> TensorAccumulator:
    acc = TensorAccumulator()
    k = 0
    for a, b in zip(fa, qa):
        acc.update(a, b, [f"s{k + i}" for i in range(len(a))])
        k += len(a)
    return acc


def test_accumulator_matches_reference():
    fa, qa = _pairs(0)
    got = _fold(fa, qa).result()
    want = ref.layer_metrics(fa, qa)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    assert got["n_samples"] == 15 and got["n_values"] == 15 * 24


def test_worst_sample_is_named():
    fa, qa = _pairs(1)
    qa[1][3] = -fa[1][3]  # sample 8 flipped: cosine -1
    r = _fold(fa, qa).result()
    assert r["worst_sample"] == "s8"
    assert r["min_cosine"] == pytest.approx(-1.0)


def test_cross_check_with_polygraphy():
    """Polygraphy's cosine and SNR over the concatenated tensor equal cosine_global and sqnr_db."""
    from polygraphy.comparator import IterationResult
    from polygraphy.comparator.compare import CosineSimilarityCompareFunc, SnrCompareFunc
    from polygraphy.logger import G_LOGGER

    fa, qa = _pairs(2)
    a, b = np.concatenate(fa), np.concatenate(qa)
    r = _fold(fa, qa).result()
    old = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.CRITICAL
    try:
        it0, it1 = IterationResult({"t": a}, runner_name="fp32"), IterationResult({"t": b}, runner_name="int8")
        cos = CosineSimilarityCompareFunc()(it0, it1)["t"].cosine_similarity
        snr = SnrCompareFunc()(it0, it1)["t"].snr
    finally:
        G_LOGGER.module_severity = old
    assert r["cosine_global"] == pytest.approx(cos, abs=1e-7)
    assert r["sqnr_db"] == pytest.approx(snr, rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.lists(st.integers(1, 6), min_size=1, max_size=5))
def test_merge_equals_one_pass(seed, sizes):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(sum(sizes), 7)).astype(np.float32)
    b = (a + rng.normal(scale=0.1, size=a.shape)).astype(np.float32)
    ids = [f"s{i}" for i in range(len(a))]
    one = TensorAccumulator()
    one.update(a, b, ids)
    parts, k = [], 0
    for s in sizes:
        acc = TensorAccumulator()
        acc.update(a[k:k + s], b[k:k + s], ids[k:k + s])
        parts.append(acc)
        k += s
    merged = parts[0]
    for p in reversed(parts[1:]):  # order does not matter
        merged = merged.merge(p)
    r1, r2 = one.result(), merged.result()
    assert r2 == r1  # exact sums: bit for bit, whatever the split and the merge order
    ref = np.float64(a).reshape(len(a), -1)  # the exactly rounded sum (math.fsum) of the per-sample values
    assert r1["cosine_global"] == pytest.approx(
        math.fsum((ref * np.float64(b)).ravel()) / math.sqrt(math.fsum((ref ** 2).ravel()) * math.fsum(
            (np.float64(b) ** 2).ravel())), rel=1e-12)


def test_nonfinite_values_are_counted_and_left_out():
    a = np.ones((2, 4), np.float32)
    b = a.copy()
    b[0, 1] = np.nan
    b[1, 2] = np.inf
    r = _fold([a], [b]).result()
    assert r["n_nonfinite"] == 2
    assert r["sqnr_db"] == math.inf and r["max_abs_error"] == 0.0 and r["cosine"] == pytest.approx(1.0)


def test_zero_tensors_follow_polygraphy_convention():
    z = np.zeros((2, 3), np.float32)
    assert _fold([z], [z]).result()["cosine"] == 1.0
    assert _fold([z], [np.ones_like(z)]).result()["cosine"] == 0.0


def test_no_batch_axis_counts_the_whole_tensor_as_one_sample():
    acc = TensorAccumulator()
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    acc.update(a, a * 2, None)
    r = acc.result()
    assert r["n_samples"] == 1 and r["cosine"] == pytest.approx(1.0)


def test_task_accumulator_and_labels():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(20, 5)).astype(np.float32)
    b = a + rng.normal(scale=0.5, size=a.shape).astype(np.float32)
    labels = [int(x) for x in rng.integers(0, 5, 20)]
    t = TaskAccumulator()
    t.update(a[:7], b[:7], labels[:7])
    t.update(a[7:], b[7:], labels[7:])
    r = t.result()
    assert r["top1_agreement"] == pytest.approx(ref.top1_agreement(a, b))
    assert r["accuracy_fp32"] == pytest.approx(np.mean(np.argmax(a, 1) == labels))
    assert r["accuracy_int8"] == pytest.approx(np.mean(np.argmax(b, 1) == labels))


def test_json_safe_round_trip():
    d = {"a": math.inf, "b": [-math.inf, 1.5], "c": {"d": math.nan}}
    back = unsafe_float(safe_float(d))
    assert back["a"] == math.inf and back["b"][0] == -math.inf and math.isnan(back["c"]["d"])


@pytest.mark.parametrize("text,metric,value", [("cosine:0.99", "cosine", 0.99), ("top1:1", "top1", 1.0),
                                               ("sqnr:30", "sqnr", 30.0), (" accuracy:0.5 ", "accuracy", 0.5),
                                               ("metric:-2", "metric", -2.0)])
def test_parse_target(text, metric, value):
    t = parse_target(text)
    assert (t.metric, t.value) == (metric, value)


@pytest.mark.parametrize("text,msg", [("cosine", "expected METRIC:VALUE"), ("cosin:0.9", "did you mean 'cosine:0.9'"),
                                      ("top1:abc", "'abc' is not a number"), ("top1:99", "lies in [0, 1]"),
                                      ("sqnr:inf", "must be finite")])
def test_parse_target_errors(text, msg):
    with pytest.raises(ConfigError) as e:
        parse_target(text)
    full = str(e.value) + " " + (e.value.hint or "")
    assert msg in full


class MeanAbsDiff:
    """Streaming user metric: minus the mean |int8 - fp32| of the first output."""

    def __init__(self) -> None:
        self.total, self.n = 0.0, 0

    def update(self, fp32, int8, labels):
        k = next(iter(fp32))
        self.total += float(np.abs(int8[k] - fp32[k]).sum())
        self.n += fp32[k].size

    def result(self) -> float:
        return -self.total / self.n


def batch_agreement(fp32, int8, labels):
    k = next(iter(fp32))
    return float(np.mean(np.argmax(fp32[k], 1) == np.argmax(int8[k], 1)))


def test_user_metrics_streaming_and_batch_function():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(10, 3)).astype(np.float32)
    b = a + rng.normal(scale=0.7, size=a.shape).astype(np.float32)
    for metric, want in [(MeanAbsDiff, -float(np.mean(np.abs(b - a)))),
                         (batch_agreement, ref.top1_agreement(a, b))]:
        om = OutputMetrics(["y"], UserMetric.wrap(metric))
        om.update({"y": a[:4]}, {"y": b[:4]}, [f"s{i}" for i in range(4)], None)
        om.update({"y": a[4:]}, {"y": b[4:]}, [f"s{i}" for i in range(4, 10)], None)
        assert om.value("metric") == pytest.approx(want, rel=1e-6)


def test_load_metric_by_dotted_path():
    m = load_metric("test_compare_metrics:batch_agreement")
    assert m.name == "test_compare_metrics:batch_agreement"
    with pytest.raises(ConfigError, match="has no attribute"):
        load_metric("test_compare_metrics:nope")
    with pytest.raises(ConfigError, match="cannot import"):
        load_metric("no_such_module_xyz:f")
    with pytest.raises(ConfigError, match="expected module.path:function"):
        load_metric("justaname")
    with pytest.raises(ConfigError, match="takes 1 required"):
        UserMetric.wrap(lambda x: 0.0)


def test_classifier_targets_need_a_classifier_output():
    om = OutputMetrics(["y"])
    om.update({"y": np.ones((2, 1, 4, 4), np.float32)}, {"y": np.ones((2, 1, 4, 4), np.float32)}, ["a", "b"], None)
    with pytest.raises(ConfigError, match="needs a classifier output"):
        om.value("top1")
    assert om.value("cosine") == pytest.approx(1.0)
