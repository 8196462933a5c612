"""Re-calibrate from shards: a run keeps mergeable statistics per shard; dropping samples re-collects only the
touched shards, and the result equals a fresh collection on the remaining samples, bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from calib.calibrate import parse_method, calibrate_all, load_ranges
from calib.collect import collect
from calib.config import RunConfig
from calib.data.preprocess import spec_of_model
from calib.model import load_model
from calib.pipeline import execute, open_run_data
from calib.recalibrate import SHARD_SIZE, load_shards, plan_shards, recalibrate
from calib.runs import RunStore
from calib.stats import ActivationStats
from tests.models import cnn_residual, save


def _same(a: ActivationStats, b: ActivationStats) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(
        np.array_equal(h.pos, g.pos) and np.array_equal(h.neg, g.neg)
        and (h.exp, h.min, h.max, h.n, h.n_nonfinite) == (g.exp, g.min, g.max, g.n, g.n_nonfinite)
        for t, h in a.tensors.items() for g in [b.tensors[t]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("recal")
    model = save(cnn_residual(size=16), root / "m.onnx")
    x = np.random.default_rng(3).normal(0, 1, (40, 3, 16, 16)).astype(np.float32)
    x[7] *= 6  # one sample sets most maxima: dropping it changes the ranges
    np.savez(root / "calib.npz", x=x)
    store = RunStore(root / "store")
    cfg = RunConfig(name="base", store=store.root, model=root / "m.onnx", calib_data=root / "calib.npz",
                    batch_size=8, html=False, methods=["entropy", "minmax", "percentile"], cache=True,
                    exclude=[])
    run = execute(cfg, store=store, command=["test"])
    return {"store": store, "run": run, "model": model, "cfg": cfg}


def test_plan_shards():
    assert plan_shards(list("abcde"), 2) == [["a", "b"], ["c", "d"], ["e"]]


def test_a_run_keeps_shards_whose_merge_is_its_statistics(base):
    run = base["run"]
    sh = load_shards(run)
    assert sh is not None and [len(g) for g in sh.groups] == [len(x) for x in plan_shards(list(range(40)), SHARD_SIZE)]
    assert len(sh.groups) >= 3
    parts = [ActivationStats.load(p) for p in sh.paths]
    total = parts[0]
    for p in parts[1:]:
        total = total.merge(p)
    assert _same(total, ActivationStats.load(run.artifact("stats")))


def test_dropping_samples_recollects_only_touched_shards_and_equals_a_fresh_collection(base):
    run, store = base["run"], base["store"]
    model = load_model(base["model"])
    src = open_run_data(run.manifest["data"]["path"], model)
    ids = [i for g in load_shards(run).groups for i in g]
    groups = load_shards(run).groups
    k = next(j for j, g in enumerate(groups) if "calib.npz[7]" in g)  # the shard of the scaled sample 7
    drop = {"calib.npz[7]", next(i for i in groups[k] if i != "calib.npz[7]")}
    keep = [i for i in ids if i not in drop]
    res = recalibrate(store, run, model, src, keep, all_methods=True)
    new = res.run
    n = len(groups)
    assert new.is_complete and (res.reused, res.recollected, res.samples_collected) == (n - 1, 1, len(groups[k]) - 2)
    fresh = collect(model, src.subset([ids.index(i) for i in keep]), batch_size=5)
    merged = ActivationStats.load(new.artifact("stats"))
    assert _same(merged, fresh)
    want = calibrate_all(fresh, ["entropy", "minmax", "percentile"])
    got = load_ranges(new.artifact("ranges"))
    for m, r in want.items():
        assert {t: v.amax for t, v in r.tensors.items()} == {t: v.amax for t, v in got[m].tensors.items()}
    old_amax = load_ranges(run.artifact("ranges"))["minmax"].tensors
    assert any(old_amax[t].amax != v.amax for t, v in want["minmax"].tensors.items())  # sample 7 mattered
    q = onnx.load(new.artifact("model"))
    assert q.graph.node and new.artifact("cache").read_text().strip()
    assert new.read_json("calib_ids") == keep and spec_of_model(q) is None  # arrays: no image spec
    again = recalibrate(store, new, model, src, keep[1:])  # shards of the new run are reused in turn
    assert (again.reused, again.recollected) == (n - 1, 1)
    # ranges only: the methods the shipped model uses (auto's base method and its per-tensor candidates)
    auto = new.read_json("auto")
    used = {parse_method(m).label for m in [auto["base_method"], *(r["chosen"] for r in auto["tensors"].values())]}
    assert set(load_ranges(again.run.artifact("ranges"))) == used


def test_dropping_from_two_shards_collects_their_rest_once(base):
    run, store = base["run"], base["store"]
    model = load_model(base["model"])
    src = open_run_data(run.manifest["data"]["path"], model)
    old = load_shards(run).groups
    ids = [i for g in old for i in g]
    keep = [i for i in ids if i not in (old[0][3], old[1][2])]  # one sample from each of shards 0 and 1
    res = recalibrate(store, run, model, src, keep)
    touched = len(old[0]) + len(old[1]) - 2
    assert (res.reused, res.recollected, res.samples_collected) == (len(old) - 2, 1, touched)
    groups = load_shards(res.run).groups
    assert [len(g) for g in groups] == [touched, *map(len, old[2:])] and sorted(i for g in groups for i in g) == sorted(keep)
    fresh = collect(model, src.subset([ids.index(i) for i in keep]), batch_size=8)
    assert _same(ActivationStats.load(res.run.artifact("stats")), fresh)


def test_vectorised_merge_and_subtraction_equal_pairwise_merges(tmp_path):
    from functools import reduce

    from calib.shard_merge import index_rows, merge_all, merge_without
    from calib.stats import TensorHistogram

    rng = np.random.default_rng(11)
    shards, names = [], ["t0", "t1", "t2"]
    for k in range(5):
        s = ActivationStats({t: TensorHistogram() for t in names}, "sha")
        for j, t in enumerate(names):
            x = rng.normal(0, 1.0 + j, 400).astype(np.float32)
            if k == 2 and t == "t1":
                x[0] = 3e4  # shard 2 alone sets t1's width: dropping it needs a finer grid
            if k == 3 and t == "t2":
                x[1] = np.nan
            s.tensors[t].update(x)
        s.add_samples([f"s{k}"])
        shards.append(s)
        s.save(tmp_path / f"s{k}.npz")
    pairwise = reduce(lambda a, b: a.merge(b), shards)
    assert _same(merge_all(shards), pairwise) and merge_all(shards).equals(pairwise)
    index = (names, np.stack([index_rows(s, names) for s in shards]))
    for dropped in ([0, 3], [1, 2, 4]):
        kept = [k for k in range(5) if k not in dropped]
        got = merge_without(pairwise, [shards[k] for k in dropped], index, kept, [tmp_path / f"s{k}.npz" for k in kept])
        want = reduce(lambda a, b: a.merge(b), [shards[k] for k in kept])
        assert _same(got, want) and got.equals(want), dropped
    assert want.tensors["t1"].exp < pairwise.tensors["t1"].exp  # the last case needed the finer grid


def test_a_run_reusing_statistics_keeps_the_shards_so_recalibrating_it_collects_little(base):
    store, run = base["store"], base["run"]
    again = execute(base["cfg"], store=store, command=["test"])
    assert again.manifest.get("stats_reused_from") == run.id
    assert load_shards(again).groups == load_shards(run).groups and load_shards(again).index is not None
    model = load_model(base["model"])
    src = open_run_data(run.manifest["data"]["path"], model)
    groups = load_shards(again).groups
    ids = [i for g in groups for i in g]
    res = recalibrate(store, again, model, src, ids[1:])
    assert (res.reused, res.recollected, res.samples_collected) == (len(groups) - 1, 1, len(groups[0]) - 1)
    assert _same(ActivationStats.load(res.run.artifact("stats")), collect(model, src.subset(range(1, len(ids)))))
