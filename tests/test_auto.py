"""``choose_auto``: per-tensor choice on a model built so that two tensors need different methods."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from calib.calibrate import calibrate
from calib.collect import collect
from calib.compare.auto import CANDIDATES, candidate_ranges, choose_auto
from calib.data import ListSource, Sample
from calib.data.split import split_source
from calib.export import export_qdq, scale_report
from calib.model import model_from_proto

D = 64  # features per branch; outliers sit in column 0 of both branches


def two_branch_model(seed: int = 0) -> onnx.ModelProto:
    """y = a @ Wa + b @ Wb. Column 0 of ``a`` carries real signal (its rare outliers matter: keep them,
    minmax); column 0 of ``b`` is ignored (row 0 of Wb is 0: clipping its outliers costs nothing)."""
    rng = np.random.default_rng(seed)
    wa = rng.normal(0, 0.3, (D, 8)).astype(np.float32)
    wa[0] = 1.0
    wb = rng.normal(0, 0.3, (D, 8)).astype(np.float32)
    wb[0] = 0.0
    nodes = [helper.make_node("MatMul", ["a", "wa"], ["ya"], name="mm_a"),
             helper.make_node("MatMul", ["b", "wb"], ["yb"], name="mm_b"),
             helper.make_node("Add", ["ya", "yb"], ["y"], name="add")]
    g = helper.make_graph(nodes, "two_branch",
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", D]) for n in ("a", "b")],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                          [numpy_helper.from_array(wa, "wa"), numpy_helper.from_array(wb, "wb")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="calib-tests")
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m


def two_branch_data(n: int, seed: int, prefix: str) -> ListSource:
    """Gaussian features; in 6 % of samples column 0 holds an outlier of +-60."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = rng.normal(0, 1, D).astype(np.float32)
        if rng.random() < 0.06:
            x[0] = 60.0 * rng.choice([-1.0, 1.0])
        # both branches read the same values, so every single method gives both one range
        out.append(Sample(f"{prefix}{i}", {"a": x, "b": x.copy()}))
    return ListSource(out)


def reference_sqnr_db(fp32: onnx.ModelProto, qdq: onnx.ModelProto, src: ListSource) -> float:
    """Output SQNR over all samples, with plain ONNX Runtime sessions and numpy (independent of calib)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    feeds = {k: np.stack([s.feeds[k] for s in src]) for k in ("a", "b")}
    ref = ort.InferenceSession(fp32.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(qdq.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return float(10 * np.log10((ref ** 2).sum() / ((got - ref) ** 2).sum()))


@pytest.fixture(scope="module")
def case():
    proto = two_branch_model()
    fm = model_from_proto(proto)
    calib_src = two_branch_data(400, seed=1, prefix="calib/")
    held_out = two_branch_data(400, seed=2, prefix="eval/")
    stats = collect(fm, calib_src, batch_size=64)
    sp = split_source(calib_src, 0.25)
    choice = choose_auto(fm, stats, sp.select, batch_size=64)
    return proto, fm, stats, held_out, choice


def test_each_tensor_gets_the_range_it_needs(case):
    _, _, stats, _, choice = case
    mm = calibrate(stats, "minmax")
    assert choice.ranges["a"].amax == pytest.approx(mm["a"].amax)  # outliers that matter: kept
    assert choice.ranges["b"].amax < 0.2 * mm["b"].amax  # outliers that do not: clipped
    rec = choice.records["b"]
    assert rec["chosen"] != "minmax" and rec["runner_up"] is not None and rec["margin"] > 0


def test_per_tensor_choice_beats_every_single_method_on_held_out_data(case):
    proto, fm, stats, held_out, choice = case
    auto = reference_sqnr_db(proto, export_qdq(fm, choice.ranges).model, held_out)
    singles = {c: reference_sqnr_db(proto, export_qdq(fm, calibrate(stats, c)).model, held_out)
               for c in CANDIDATES}
    for c, v in singles.items():
        assert auto >= v - 1e-9, (c, v, auto)
    assert auto > max(singles.values()) + 1.0  # the mix is clearly better, not a tie


def test_records_and_json(case):
    *_, choice = case
    doc = choice.to_json()
    assert doc["format"] == "calib.auto" and set(doc["tensors"]) == {"a", "b"}
    assert choice.ranges.method == "auto"
    assert {r.method for r in choice.ranges.tensors.values()} <= set(choice.scores)
    assert choice.stopped in ("no change helps", "max_rounds (2)")
    # scores of the single methods come from the selection samples only
    assert choice.n_select < 400


def test_a_zero_time_budget_returns_the_best_single_method(case):
    proto, fm, stats, held_out, _ = case
    sp = split_source(two_branch_data(400, seed=1, prefix="calib/"), 0.25)
    c = choose_auto(fm, stats, sp.select, batch_size=64, time_budget=0.0)
    assert c.stopped.startswith("time budget") and c.changed == {}
    assert c.value == c.scores[c.base_method] == max(c.scores.values())


def test_scales_json_names_the_candidate_per_tensor(case):
    _, fm, stats, _, choice = case
    q = export_qdq(fm, choice.ranges)
    doc = choice.annotate_scales(scale_report(q, {"auto": choice.ranges, **candidate_ranges(stats)}, chosen="auto"))
    rows = {r["tensor"]: r for r in doc["activations"]}
    assert rows["a"]["method"] == choice.records["a"]["chosen"] and rows["b"]["method"] != "minmax"
    assert rows["b"]["auto"]["runner_up"] == choice.records["b"]["runner_up"]
    assert rows["b"]["amax"] == pytest.approx(choice.ranges["b"].amax)
