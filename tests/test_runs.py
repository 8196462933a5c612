"""The run store: atomic files, COMPLETE marker last, concurrent runs, refusal of foreign folders."""

import json
import threading

import pytest

from calib.errors import RunStoreError
from calib.runs import COMPLETE, MANIFEST, RunStore, fingerprint_path


def test_create_complete_and_list(tmp_path):
    st = RunStore(tmp_path / "store")
    run = st.create("m", command=["calib", "run"], config={"a": 1}, model={"path": "m.onnx", "sha256": "ab"})
    assert run.status == "running"
    run.add_artifact("ranges", "ranges.json").write_text("{}")
    run.set_metrics({"top1_agreement": 0.98})
    with run.timing("collect"):
        pass
    run.complete()
    assert (run.dir / COMPLETE).exists()
    infos = st.list()
    assert [i.id for i in infos] == [run.id]
    assert infos[0].status == "complete" and infos[0].metrics["top1_agreement"] == 0.98
    m = json.loads((run.dir / MANIFEST).read_text())
    assert m["versions"]["onnxruntime"] and m["timings_s"]["collect"] >= 0
    assert st.get(run.id[:12]).id == run.id  # unique prefix


def test_dead_writer_is_incomplete(tmp_path):
    st = RunStore(tmp_path)
    run = st.create("m")
    run.update(pid=2 ** 22 + 12345)  # no such process
    assert st.get(run.id).status == "incomplete"


def test_failed_run_keeps_its_error(tmp_path):
    st = RunStore(tmp_path)
    run = st.create("m")
    run.fail("bad input: x")
    info = st.list()[0]
    assert info.status == "failed" and info.error == "bad input: x"


def test_concurrent_runs_get_distinct_directories(tmp_path):
    st = RunStore(tmp_path)
    runs = []

    def make():
        r = st.create("same-name")
        r.set_metrics({"x": 1})
        r.complete()
        runs.append(r.id)

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(runs)) == 8
    assert all(i.status == "complete" for i in st.list())


def test_not_a_run(tmp_path):
    (tmp_path / "store" / "junk").mkdir(parents=True)
    st = RunStore(tmp_path / "store")
    with pytest.raises(RunStoreError, match="not a calib run"):
        st.get(tmp_path / "store" / "junk")
    assert st.list()[0].status == "unreadable"
    (tmp_path / "store" / "junk" / MANIFEST).write_text('{"format": "calib.run", "version": 0}')
    with pytest.raises(RunStoreError, match="run format version 0"):
        st.get("junk")
    with pytest.raises(RunStoreError, match="no run 'zzz'"):
        st.get("zzz")


def test_empty_store_lists_nothing(tmp_path):
    assert RunStore(tmp_path / "none").list() == []


def test_fingerprint_changes_with_content(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.txt").write_text("1")
    f1 = fingerprint_path(d)
    (d / "a.txt").write_text("2")
    assert fingerprint_path(d) != f1
    with pytest.raises(RunStoreError):
        fingerprint_path(tmp_path / "missing")
