"""NpzSource streams .npz members sample by sample; it must give exactly what np.load gives."""

import numpy as np
import pytest

from calib.data.arrays import NpzSource
from calib.errors import InputDataError


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_streamed_samples_equal_np_load(tmp_path, save):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 3, 5, 7)).astype(np.float32)
    t = rng.integers(0, 1000, size=(37, 11), dtype=np.int64)
    save(tmp_path / "d.npz", x=x, t=t, labels=np.arange(37) % 4)
    src = NpzSource(tmp_path / "d.npz")
    ref = np.load(tmp_path / "d.npz", allow_pickle=False)
    got = list(src)
    assert [s.id for s in got] == [f"d.npz[{i}]" for i in range(37)]
    assert np.array_equal(np.stack([s.feeds["x"] for s in got]), ref["x"])
    assert np.array_equal(np.stack([s.feeds["t"] for s in got]), ref["t"])
    assert [s.label for s in got] == list(ref["labels"])
    order = [30, 2, 2, 36, 0, 17]  # backwards and repeated indices reopen the stream
    sub = list(src.subset(order))
    assert all(np.array_equal(s.feeds["x"], ref["x"][i]) for s, i in zip(sub, order))
    assert list(src) and np.array_equal(next(iter(src)).feeds["x"], ref["x"][0])  # iterating twice works


def test_fortran_ordered_member_is_read_whole(tmp_path):
    x = np.asfortranarray(np.arange(24, dtype=np.float32).reshape(4, 6))
    np.savez(tmp_path / "f.npz", x=x)
    assert np.array_equal(np.stack([s.feeds["x"] for s in NpzSource(tmp_path / "f.npz")]), x)


def test_truncated_member_names_the_array(tmp_path):
    x = np.zeros((10, 1000), np.float32)
    np.savez(tmp_path / "t.npz", x=x)
    raw = (tmp_path / "t.npz").read_bytes()
    (tmp_path / "bad.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputDataError, match="bad.npz"):
        list(NpzSource(tmp_path / "bad.npz"))
