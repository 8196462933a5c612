"""Sensitivity ranking and advise (automatic mixed precision) on a small CNN with planted faults."""

from __future__ import annotations

import json

import numpy as np
import pytest
from compare_graphs import cnn_setup, plant_bad_scale

from calib.calibrate import Ranges, TensorRange
from calib.compare import compare
from calib.compare.advice import advice_json_path, advise
from calib.compare.sensitivity import sensitivity
from calib.errors import TargetNotMet
from calib.export import export_qdq
from calib.model import load_model


@pytest.fixture(scope="module")
def setup():
    return cnn_setup()


def test_planted_bad_scale_ranks_first_in_compare(setup):
    """Done-when, part 1: compare ranks the node with the bad scale first."""
    m, src, _, _, q = setup
    bad = export_qdq(m, q_ranges(setup))
    plant_bad_scale(bad.model, "conv3")
    r = compare(m, bad, src, sensitivity=True, sensitivity_samples=48)
    rows = r.sensitivity["rows"]
    assert rows[0]["node"] == "conv3" and rows[0]["rank"] == 1
    float_best = max(rows, key=lambda x: x["float_only"]["sqnr_db"])
    assert float_best["node"] == "conv3"


def q_ranges(setup) -> Ranges:
    return setup[3]


def _output_sqnr(m, qdq, src) -> float:
    return compare(m, qdq, src, layers=False).outputs["logits"]["sqnr_db"]


@pytest.mark.parametrize("node", ["conv1", "conv3"])
def test_variants_equal_independently_exported_models(setup, node):
    """'Only X quantized' and 'only X in float' equal export_qdq with the matching exclude lists."""
    m, src, _, ranges, q = setup
    s = sensitivity(m, q, src, max_samples=48, min_samples=48)
    row = next(r for r in s.rows if r["node"] == node)
    others = [n for n in q.quantized_nodes if n != node]
    only = export_qdq(m, ranges, exclude=others)
    assert only.quantized_nodes == [node]
    assert row["quant_only"]["sqnr_db"] == pytest.approx(_output_sqnr(m, only, src), rel=1e-6)
    without = export_qdq(m, ranges, exclude=[node])
    # (for fc, TensorRT placement also drops the pooling's Q/DQ once fc is float: not comparable)
    assert sorted(without.quantized_nodes) == sorted(others)
    assert row["float_only"]["sqnr_db"] == pytest.approx(_output_sqnr(m, without, src), rel=1e-6)
    assert s.all_quantized["sqnr_db"] == pytest.approx(_output_sqnr(m, q, src), rel=1e-6)
    assert s.all_float["sqnr_db"] == float("inf")  # the all-float reconstruction is FP32 exactly


def test_early_stop_and_progress(setup):
    m, src, _, _, q = setup
    bad = export_qdq(m, q_ranges(setup))
    plant_bad_scale(bad.model, "conv2")
    seen = []
    s = sensitivity(m, bad, src, batch_size=4, min_samples=8, patience=2, top_k=1, max_samples=48,
                    progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert s.stopped_early and s.n_samples < 48
    assert s.ranking[0] == "conv2"
    assert seen[0] == ("sensitivity", 0, 48) and seen[-1][1] == s.n_samples


def test_advise_excludes_the_bad_node_and_meets_the_target(setup, tmp_path):
    """Done-when, part 2: a bad range on conv3's input; advise leaves conv3 in float and meets the target."""
    m, src, _, ranges, _ = setup
    bad = dict(ranges.tensors)
    bad["r2"] = TensorRange(bad["r2"].amax * 40, "minmax")
    out = tmp_path / "m.int8.onnx"
    a = advise(m, Ranges("minmax", bad, ranges.model_sha256), src, target="cosine:0.999", output=out)
    assert a.met and a.exclude == ["conv3"]
    assert a.curve[0]["metric"] < 0.999 <= a.curve[-1]["metric"]
    assert [c["n_float_nodes"] for c in a.curve] == [0, 1]
    # the written model reaches the recorded metric when compared from scratch
    written = load_model(out)
    assert compare(m, written, src, layers=False).outputs["logits"]["cosine"] == pytest.approx(a.metric)
    doc = json.loads(advice_json_path(out).read_text())
    assert doc["exclude"] == ["conv3"] and doc["met"] and len(doc["curve"]) == 2


def test_advise_tries_other_methods_per_tensor(setup):
    m, src, stats, _, _ = setup
    a = advise(m, stats, src, target="sqnr:35", methods=["percentile:99", "minmax", "entropy"])
    assert a.met and a.metric >= 35
    assert any(c["action"].startswith("method") for c in a.curve)
    assert a.changed and all(v in ("minmax", "entropy") for v in a.changed.values())
    metrics = [c["metric"] for c in a.curve]
    assert metrics[-1] == max(metrics)


def test_unreachable_target_keeps_the_best_model(setup, tmp_path):
    m, src, stats, _, _ = setup
    out = tmp_path / "best.onnx"
    with pytest.raises(TargetNotMet) as e:
        advise(m, stats, src, target="accuracy:0.99", methods=["minmax"], output=out)
    adv = e.value.advice
    assert not adv.met and out.exists() and advice_json_path(out).exists()
    assert "FP32 model itself reaches accuracy" in e.value.hint
    assert adv.metric == max(c["metric"] for c in adv.curve)
    assert len(adv.curve) > 1  # it tried: every node ends in float
    fp32_acc = compare(m, load_model(out), src, layers=False).outputs["logits"]["accuracy_int8"]
    assert fp32_acc == pytest.approx(adv.metric)


@pytest.mark.parametrize("budget", [{"max_steps": 1}, {"time_budget_s": 0.0}])
def test_a_step_or_time_budget_stops_the_search_and_keeps_the_best(setup, tmp_path, budget):
    m, src, stats, _, _ = setup
    out = tmp_path / "best.onnx"
    with pytest.raises(TargetNotMet) as e:
        advise(m, stats, src, target="accuracy:0.99", methods=["minmax"], output=out, **budget)
    adv = e.value.advice
    steps = budget.get("max_steps", 1)  # a time budget, even 0 s, lets one node be tried
    assert len(adv.curve) <= 1 + steps
    if "max_steps" in budget:
        assert len(adv.curve) == 1 + steps  # the start plus exactly the allowed steps
    assert adv.stopped.startswith("max_steps" if "max_steps" in budget else "time budget")
    assert "stopped by" in str(e.value)
    assert json.loads(advice_json_path(out).read_text())["stopped"] == adv.stopped
    assert adv.metric == max(c["metric"] for c in adv.curve)


def test_without_an_order_advise_starts_from_the_best_method(setup):
    m, src, stats, _, _ = setup
    with pytest.raises(TargetNotMet) as e:  # unreachable, and no step allowed: only the start is measured
        advise(m, stats, src, target="sqnr:80", max_steps=0)
    a = e.value.advice
    assert set(a.base_scores) == {"entropy", "percentile", "mse", "minmax"}
    assert a.base_method == max(a.base_scores, key=a.base_scores.get)
    assert a.curve[0]["metric"] == a.base_scores[a.base_method]
    # the start equals a from-scratch comparison of that method's all-INT8 model
    from calib.calibrate import calibrate, parse_method
    q = export_qdq(m, calibrate(stats, parse_method(a.base_method)))
    assert compare(m, q, src, layers=False).outputs["logits"]["sqnr_db"] == pytest.approx(a.curve[0]["metric"])


def test_already_met_target_changes_nothing(setup):
    m, src, _, ranges, _ = setup
    a = advise(m, ranges, src, target="cosine:0.5")
    assert a.met and a.exclude == [] and len(a.curve) == 1 and a.sensitivity is None


def test_user_metric_target(setup):
    m, src, _, ranges, _ = setup

    def neg_max_err(fp32, int8, labels):
        return -float(np.max(np.abs(fp32["logits"] - int8["logits"])))

    a = advise(m, ranges, src, target="metric:-0.0001", metric=neg_max_err)
    assert a.met and a.metric >= -0.0001
