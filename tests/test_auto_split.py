"""The split by sample id: deterministic, order-free, and selection never overlaps reporting."""

from __future__ import annotations

import numpy as np
import pytest
from test_auto import two_branch_data, two_branch_model

from calib.collect import collect
from calib.compare import compare
from calib.compare.auto import choose_auto
from calib.data import ListSource, Sample
from calib.data.split import hash_fraction, split_ids, split_source
from calib.errors import ConfigError, InputDataError
from calib.export import export_qdq
from calib.model import model_from_proto


class Recording:
    """A source that remembers which sample ids each pass over it yielded."""

    def __init__(self, inner) -> None:
        self.inner, self.layout, self.seen = inner, inner.layout, set()

    def __iter__(self):
        for s in self.inner:
            self.seen.add(s.id)
            yield s

    def __len__(self) -> int:
        return len(self.inner)


def test_split_depends_on_the_id_alone():
    ids = [f"img_{i:04d}.png" for i in range(2000)]
    sel, rep = split_ids(ids, 0.25)
    assert set(sel).isdisjoint(rep) and set(sel) | set(rep) == set(ids)
    assert 0.22 < len(sel) / len(ids) < 0.28
    sel2, _ = split_ids(list(reversed(ids)) + ["new_sample"], 0.25)
    assert set(sel) <= set(sel2)  # order and other samples do not move a sample
    # the rule as documented: sha256 of the id, first 8 bytes / 2**64
    import hashlib
    i = ids[7]
    assert hash_fraction(i) == int.from_bytes(hashlib.sha256(i.encode()).digest()[:8], "big") / 2 ** 64


def test_split_source_guards():
    src = ListSource([Sample(f"s{i}", {"x": np.zeros(2, np.float32)}) for i in range(3)])
    sp = split_source(src, 0.25)
    assert len(sp.select) >= 1 and len(sp.report) >= 1
    assert [s.id for s in sp.select] + [s.id for s in sp.report] != []
    with pytest.raises(ConfigError):
        split_source(src, 1.0)
    with pytest.raises(InputDataError, match="sample s0"):
        split_source(ListSource([Sample("s0", {}), Sample("s0", {})]), 0.5)
    with pytest.raises(InputDataError, match="too few"):
        split_source(ListSource([Sample("s0", {})]), 0.5)


def test_selection_and_reporting_sets_never_overlap():
    proto = two_branch_model()
    fm = model_from_proto(proto)
    data = two_branch_data(120, seed=3, prefix="c/")
    all_rec = Recording(data)
    stats = collect(fm, all_rec, batch_size=32)
    sp = split_source(data, 0.25)
    sel, rep = Recording(sp.select), Recording(sp.report)
    choice = choose_auto(fm, stats, sel, batch_size=32, max_rounds=1)
    compare(fm, export_qdq(fm, choice.ranges), rep, batch_size=32)
    assert all_rec.seen == {s.id for s in data}  # statistics on all of it
    assert sel.seen and rep.seen
    assert sel.seen.isdisjoint(rep.seen)  # what chose never reported
    assert sel.seen == set(sp.select.ids) and rep.seen == set(sp.report.ids)
    assert choice.n_select == len(sp.select)
