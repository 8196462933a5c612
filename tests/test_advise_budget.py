"""advise: ranking by local error, "auto" start, progress per stage, time budget and how close it got."""

from __future__ import annotations

import json

import pytest
from compare_graphs import cnn_setup, plant_bad_scale

from calib.compare.advice import DEFAULT_TIME_BUDGET_S, advice_json_path, advise
from calib.compare.mapping import map_models
from calib.compare.ranking import rank_nodes
from calib.errors import TargetNotMet
from calib.model import model_from_proto


@pytest.fixture(scope="module")
def setup():
    return cnn_setup()


def test_ranking_puts_the_node_where_error_enters_first(setup):
    m, src, _, _, q = setup
    plant_bad_scale(q.model, "conv3", factor=40.0)
    tm = map_models(m, model_from_proto(q.model))
    s = rank_nodes(m, tm, src, samples=16, shortlist=2, batch_size=8)
    assert s.ranking[0] == "conv3" and sorted(s.ranking) == sorted(tm.quantized)
    row = s.rows[0]
    assert row["local"]["sqnr_db"] == min(r["local"]["sqnr_db"] for r in s.rows)
    measured = [r for r in s.rows if r["float_only"]["sqnr_db"] == r["float_only"]["sqnr_db"]]
    assert len(measured) == 2 and s.n_samples == 16  # shortlist only, on the small subset


def test_advise_from_auto_with_stage_progress(setup, tmp_path):
    m, src, stats, _, _ = setup
    seen = []
    out = tmp_path / "a.onnx"
    a = advise(m, stats, src, target="sqnr:30", methods=["auto"], output=out, batch_size=16,
               progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert a.base_method == "auto" and a.auto["format"] == "calib.auto"
    assert a.met and a.gap == 0.0
    doc = json.loads(advice_json_path(out).read_text())
    assert doc["auto"]["tensors"] and doc["gap"] == 0.0
    stages = {s for s, _, _ in seen}
    # one bar per stage: never a stage per candidate variant or per verification
    assert all(s.startswith(("auto", "advise")) for s in stages)
    steps = [(d, t) for s, d, t in seen if s.startswith("advise step")]
    assert all(0 <= d < t for d, t in steps)


def test_default_budget_and_how_close(setup):
    m, src, stats, _, _ = setup
    assert DEFAULT_TIME_BUDGET_S == 240.0
    with pytest.raises(TargetNotMet) as e:
        advise(m, stats, src, target="sqnr:200", methods=["minmax"], max_steps=2)
    a = e.value.advice
    assert a.gap == pytest.approx(200 - a.metric) and a.gap > 0
    assert f"({a.gap:.3g} short)" in str(e.value)
