"""``choose_auto`` under a time budget that cuts a round, and the "auto" memory bound."""

from __future__ import annotations

import itertools

from calib.collect import collect
from calib.collect_groups import default_max_memory, rss_bytes
from calib.compare import auto as auto_mod
from calib.compare.auto import choose_auto
from calib.data.split import split_source
from calib.distributed import AUTO_MAX_MEMORY, resolve_max_memory
from calib.model import model_from_proto
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


def test_advise_gets_what_the_run_has_left():
    import time

    from calib.pipeline import steps

    ctx = steps.Context.__new__(steps.Context)
    ctx.started = time.perf_counter()
    left = steps.advise_budget(ctx)
    assert steps.RUN_BUDGET_S - steps.AFTER_ADVISE_S - 5 < left <= steps.RUN_BUDGET_S - steps.AFTER_ADVISE_S
    ctx.started = time.perf_counter() - 10 * steps.RUN_BUDGET_S  # collect and choose took everything
    assert steps.advise_budget(ctx) == steps.MIN_ADVISE_S
