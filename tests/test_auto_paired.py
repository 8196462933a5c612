"""The paired per-sample acceptance rule (calib.compare.paired) that auto, its transforms and bias correction
use: checked against a plain numpy/statistics reference, and on which samples each decision was made."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from test_auto import two_branch_data, two_branch_model

import calib.compare.auto as auto_mod
from calib.collect import collect
from calib.compare.auto import choose_auto
from calib.compare.paired import MIN_T, paired_gain
from calib.compare.targets import OutputMetrics
from calib.data.split import split_source
from calib.model import model_from_proto


def metrics_of(fp32: np.ndarray, int8: np.ndarray, ids: list[str]) -> OutputMetrics:
    m = OutputMetrics(["y"])
    m.update({"y": fp32}, {"y": int8}, ids, None)
    return m


def reference(fp32, cur, cand):
    """Mean and standard error of the per-sample loss differences, from the definition, with ``statistics``."""
    energy = float((fp32.astype(np.float64) ** 2).sum())
    lc = [float(((c - a) ** 2).sum()) / energy for a, c in zip(fp32.astype(np.float64), cur.astype(np.float64))]
    lk = [float(((k - a) ** 2).sum()) / energy for a, k in zip(fp32.astype(np.float64), cand.astype(np.float64))]
    d = [x - y for x, y in zip(lc, lk)]
    return statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))


def sqnr(fp32, got) -> float:
    return float(10 * np.log10((fp32.astype(np.float64) ** 2).sum() / ((got - fp32).astype(np.float64) ** 2).sum()))


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    n = 32
    fp32 = rng.normal(0, 1, (n, 16)).astype(np.float32)
    cur = fp32 + rng.normal(0, 0.05, fp32.shape).astype(np.float32)
    return [f"s{i}" for i in range(n)], fp32, cur, rng


def test_gain_matches_the_reference_and_a_consistent_gain_is_accepted(arrays):
    ids, fp32, cur, rng = arrays
    cand = fp32 + (cur - fp32) * 0.8  # 20 % less error on every sample
    g = paired_gain(metrics_of(fp32, cur, ids).samples, metrics_of(fp32, cand, ids).samples)
    m, se = reference(fp32, cur, cand)
    assert g.mean == pytest.approx(m, rel=1e-9) and g.se == pytest.approx(se, rel=1e-9)
    assert g.n == 32 and g.wins == 32 and g.significant(MIN_T) and g.t > 10


def test_a_gain_carried_by_one_sample_is_refused_by_the_strict_rule_though_the_pooled_sqnr_improves(arrays):
    ids, fp32, cur, rng = arrays
    cur = cur.copy()
    cur[7] = fp32[7] + 0.6 * rng.normal(0, 1, 16).astype(np.float32)  # one sample badly quantized ...
    cand = fp32 + (cur - fp32) * 1.03  # ... the candidate is slightly worse on every sample but that one
    cand[7] = fp32[7] + (cur[7] - fp32[7]) * 0.5
    assert sqnr(fp32, cand) > sqnr(fp32, cur) + 0.5  # what the old rule (any gain in SQNR) accepted
    g = paired_gain(metrics_of(fp32, cur, ids).samples, metrics_of(fp32, cand, ids).samples)
    m, se = reference(fp32, cur, cand)
    assert g.mean == pytest.approx(m, rel=1e-9) and g.mean > 0 and g.wins == 1
    assert g.mean < MIN_T * g.se and not g.significant(MIN_T)  # the strict rule refuses it ...
    assert g.significant(0.0)  # ... a plain "mean gain > 0" (the default path's threshold) takes it


def test_a_tie_never_changes_anything(arrays):
    ids, fp32, cur, _ = arrays
    g = paired_gain(metrics_of(fp32, cur, ids).samples, metrics_of(fp32, cur.copy(), ids).samples)
    assert g.mean == 0 and not g.significant(0.0) and not g.significant(MIN_T)


def test_only_shared_samples_are_compared(arrays):
    ids, fp32, cur, _ = arrays
    g = paired_gain(metrics_of(fp32[:20], cur[:20], ids[:20]).samples,
                    metrics_of(fp32[10:], fp32[10:], ids[10:]).samples)
    assert g.n == 10 and set(g.ids) == set(ids[10:20])


def test_every_auto_decision_is_paired_on_the_selection_samples_only(monkeypatch):
    """Each decision auto makes compares the two models on exactly the selection ids: never a report id."""
    proto = two_branch_model()
    fm = model_from_proto(proto)
    src = two_branch_data(400, seed=1, prefix="calib/")
    stats = collect(fm, src, batch_size=64)
    sp = split_source(src, 0.25)
    seen: list[tuple[str, ...]] = []
    real = auto_mod.paired_gain

    def spy(cur, cand):
        g = real(cur, cand)
        seen.append(g.ids)
        return g

    monkeypatch.setattr(auto_mod, "paired_gain", spy)
    choice = choose_auto(fm, stats, sp.select, batch_size=64)
    assert seen and all(set(ids) == set(sp.select.ids) for ids in seen)
    assert set(sp.select.ids).isdisjoint(sp.report.ids)
    kept = [h for h in choice.history if h["kept"]]
    assert kept and all(h["paired"]["t"] is None or h["paired"]["t"] > auto_mod.TENSOR_MIN_T for h in kept)
    assert all(h["paired"]["mean_gain"] > 0 for h in kept)
    assert all(h["paired"]["n"] == len(sp.select) for h in choice.history)
