"""Time budgets: ``choose_auto``'s round cut short, the run's budget (``calib.pipeline.budget``: every step
after collection plans for it, the best model is always written and what was cut is said), the FP32
references a run's evaluators share, advise's ranking deadline; and the memory bound ("auto", fewer passes)."""

from __future__ import annotations

import itertools
import math
import time
from types import SimpleNamespace

import models
import numpy as np
import onnxruntime as ort
import pytest

from calib.calibrate import calibrate
from calib.collect import collect
from calib.collect_groups import MemoryPlan, default_max_memory, fit, rss_bytes
from calib.compare import auto as auto_mod
from calib.compare import evaluate as evaluate_mod
from calib.compare.auto import DEFAULT_TIME_BUDGET_S, choose_auto
from calib.compare.evaluate import Evaluator, References, recording, sharing_references
from calib.compare.mapping import map_models
from calib.compare.ranking import rank_nodes
from calib.data import ListSource, Sample, open_data
from calib.data.split import split_source
from calib.distributed import AUTO_MAX_MEMORY, resolve_max_memory
from calib.errors import TargetNotMet
from calib.export import export_qdq
from calib.model import load_model, model_from_proto
from calib.pipeline import config_from_flags, quantize
from calib.pipeline.budget import (ADVISE_SHARE, AUTO_SHARE, RUN_BUDGET_S, Budget, Pace, advise_seconds,
                                   auto_seconds, run_seconds, transform_cost, verify_cost)
from tests.test_auto import two_branch_data, two_branch_model


def test_a_round_cut_by_the_budget_says_so_and_never_scores_below_the_best_single_method(monkeypatch):
    fm = model_from_proto(two_branch_model())
    src = two_branch_data(400, seed=1, prefix="calib/")
    stats = collect(fm, src, batch_size=64)
    sel = split_source(src, 0.25).select
    calls = itertools.count()
    # in time for the round to start and measure its first group, then out of time: verification is cut
    monkeypatch.setattr(auto_mod._Search, "out_of_time", lambda self: next(calls) >= 1)
    c = choose_auto(fm, stats, sel, batch_size=64)
    assert c.stopped.startswith("time budget"), c.stopped  # not "no change helps": nothing was verified
    assert c.changed == {} and c.history == []
    assert c.value == c.scores[c.base_method] == max(c.scores.values())


def test_auto_memory_bound_is_capped():
    got = resolve_max_memory("auto")
    half = default_max_memory(0.5)
    assert got <= half
    assert got <= max(AUTO_MAX_MEMORY, rss_bytes() + (1 << 30))
    assert resolve_max_memory("auto", 2) == got // 2 or abs(resolve_max_memory("auto", 2) - got // 2) < (64 << 20)
    assert resolve_max_memory("none") is None and resolve_max_memory("3GB") == 3 << 30


def _cnn_case(tmp_path, n: int = 48):
    path = models.save(models.cnn_residual(seed=3), tmp_path / "m.onnx")
    x = np.random.default_rng(3).standard_normal((n, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    return path, tmp_path / "d.npz", x


def _mean_cosine(fp32: str, qdq: str, x: np.ndarray) -> float:
    """Mean per-sample output cosine of two models, plain ONNX Runtime and numpy (independent of calib)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a, b = (ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0] for p in (fp32, qdq))
    a, b = a.reshape(len(x), -1).astype(np.float64), b.reshape(len(x), -1).astype(np.float64)
    return float(np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def test_a_tiny_run_budget_still_writes_the_best_model_says_what_it_cut_and_how_close(tmp_path):
    path, data, x = _cnn_case(tmp_path)
    out = tmp_path / "q.onnx"
    with pytest.raises(TargetNotMet) as e:  # unreachable target, a budget already spent by collection
        quantize(path, data, out, target="sqnr:200", time_budget_s=0.001)
    res = e.value.result
    stages = [c["stage"] for c in res.budget["cut"]]
    assert "advise" in stages and "bias correction" in stages, stages  # advise stopped, bias correction skipped
    assert res.budget["seconds"] == 0.001 and res.budget["used_s"] > 0
    assert "cut:" in res.budget_line and "advise stopped after" in res.budget_line
    assert res.advice.stopped.startswith("time budget") and res.advice.gap > 0 and not res.target_met
    assert "short" in str(e.value) and "time budget" in str(e.value)
    assert out.exists()  # the best model found, with held-out figures (verify always runs)
    sp = split_source(open_data(data, load_model(path)), 0.25)
    report = np.stack([s.feeds["x"] for s in sp.report])
    assert res.shipped["n_samples"] == len(report) < len(x)
    assert res.shipped["cosine"] == pytest.approx(_mean_cosine(path, str(out), report), abs=1e-5)


def test_without_a_target_or_budget_nothing_is_planned_or_cut(tmp_path):
    path, data, _ = _cnn_case(tmp_path, n=24)
    res = quantize(path, data, tmp_path / "q.onnx")
    assert res.budget is None and res.budget_line == ""
    assert run_seconds(config_from_flags(path, data, target="cosine:0.99")) == RUN_BUDGET_S
    assert run_seconds(config_from_flags(path, data, time_budget_s=12.0)) == 12.0


def test_budget_skips_what_does_not_fit_and_records_it():
    b = Budget(100.0)
    assert not b.skip("equalize", 10.0, reserve=20.0) and b.cuts == []
    b.started -= 95.0  # 5 s left
    assert b.skip("bias correction", 10.0, reserve=2.0)
    assert b.cuts[0]["stage"] == "bias correction" and "skipped (needs about 10 s" in b.cuts[0]["what"]
    assert not Budget(None).skip("x", 1e9, reserve=1e9) and Budget(None).left() == math.inf
    p = Pace()
    assert p.seconds(100) == 0.0  # nothing measured yet
    p.add(1000, 2.0)
    p.add(1000, 4.0)
    assert p.rate() == pytest.approx(0.003) and p.seconds(500) == pytest.approx(1.5)


def test_evaluators_of_a_run_share_the_fp32_reference(monkeypatch):
    fm = model_from_proto(two_branch_model())
    src = two_branch_data(40, seed=2, prefix="s/")
    q = export_qdq(fm, calibrate(collect(fm, src, batch_size=8), "minmax")).model
    runs = []
    real = evaluate_mod.open_runner

    def counting(proto, outputs, **kw):
        runs.append(kw.get("name"))
        return real(proto, outputs, **kw)

    monkeypatch.setattr(evaluate_mod, "open_runner", counting)
    alone = Evaluator(fm, src, batch_size=8, cache_bytes=0).score({"q": q})["q"].result()
    assert runs.count("FP32 model") == 1
    runs.clear()
    pace = Pace()
    with sharing_references(References()), recording(pace):
        first = Evaluator(fm, src, batch_size=8, cache_bytes=0).score({"q": q})["q"].result()
        again = Evaluator(fm, src, batch_size=8, cache_bytes=0).score({"q": q})["q"].result()
        other = Evaluator(fm, src, batch_size=4, cache_bytes=0).score({"q": q})["q"].result()  # other batches
    assert runs.count("FP32 model") == 2  # once for batch 8, once for batch 4
    assert first == again == alone and other["y"]["cosine"] == pytest.approx(alone["y"]["cosine"])
    assert len(pace.records) == 3 and pace.rate() > 0


def test_ranking_stops_measuring_isolated_sensitivity_at_its_deadline():
    fm = model_from_proto(models.cnn_residual(seed=1))
    src = ListSource([Sample(f"s{i}", {"x": v}) for i, v in
                      enumerate(np.random.default_rng(1).standard_normal((16, 3, 16, 16)).astype(np.float32))])
    q = export_qdq(fm, calibrate(collect(fm, src, batch_size=8), "minmax"))
    tm = map_models(fm, model_from_proto(q.model))
    full = rank_nodes(fm, tm, src, samples=8, nodes_per_session=1)
    def measured(sens):
        return [r for r in sens.rows if r["float_only"]["sqnr_db"] == r["float_only"]["sqnr_db"]]

    first = rank_nodes(fm, tm, src, samples=8, nodes_per_session=1, deadline=0.0)  # past: the first group only
    assert len(measured(first)) == 1 < len(measured(full))
    soon = time.perf_counter() + 1e-3
    cut = rank_nodes(fm, tm, src, samples=8, nodes_per_session=1, deadline=soon, first_deadline=soon)
    assert measured(cut) == []  # past before the first group: ranked by local error alone
    assert [r["node"] for r in cut.rows] == sorted(  # every node still ranked, by local SQNR (worst first)
        (r["node"] for r in full.rows), key=lambda n: (next(r for r in full.rows if r["node"] == n)["local"]["sqnr_db"], n))
    assert any("time budget stopped the rest" in n for n in cut.notes)


def test_memory_plan_prefers_fewer_passes_at_a_smaller_batch():
    mb = 1 << 20
    exposed = {f"t{i}": mb for i in range(10)}

    def plan():
        return MemoryPlan(240 * mb, 8, [], 100 * mb, 0, 0, 0, dict(exposed))

    got = fit(plan(), list(exposed), 8, fixed_batch=False)  # batch 8: 24 MiB per tensor, 5 per pass
    assert got.batch_size == 4 and len(got.groups) == 1  # batch 4: 12 MiB per tensor, all in one pass
    assert max(got.peak(g) for g in got.groups) <= 240 * mb
    fixed = fit(plan(), list(exposed), 8, fixed_batch=True)
    assert fixed.batch_size == 8 and len(fixed.groups) == 2


def test_shares_of_the_run_budget():
    fm = model_from_proto(models.cnn_residual(seed=1))
    cfg = SimpleNamespace(target="cosine:0.99", primary="auto", auto_transforms=[], transforms=[], limit=0,
                          high_precision="fp32", bias_samples=128)
    ctx = SimpleNamespace(cfg=cfg, model=fm, qdq=None, base=None, sel=list(range(32)), ev=list(range(96)),
                          source=list(range(128)), budget=Budget(100.0))
    left = ctx.budget.left()  # nothing measured yet: only writing is reserved
    assert auto_seconds(ctx) == pytest.approx(AUTO_SHARE * (left - 5.0), abs=0.2)
    assert advise_seconds(ctx) == pytest.approx(left - 5.0, abs=0.2)
    ctx.budget.pace.add(100.0, 1.0)  # 10 ms per node-sample: verify fits, bias correction leaves advise little
    cfg.transforms = ["bias_correction"]
    after_verify = ctx.budget.left() - verify_cost(ctx)
    full = after_verify - transform_cost(ctx, "bias_correction")
    assert 0 < full < ADVISE_SHARE * after_verify
    assert advise_seconds(ctx) == pytest.approx(ADVISE_SHARE * after_verify, abs=0.2)
    cfg.target, ctx.budget = "", Budget(None)
    assert auto_seconds(ctx) == DEFAULT_TIME_BUDGET_S and advise_seconds(ctx) is None
