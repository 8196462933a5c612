"""Property-based tests of every reader of user files (issue 18): arbitrary bytes, and well-formed files whose
contents disagree with each other, give a ``CalibError`` (CLI exit 2, one line), never another exception.

Readers: ``.npz``/``.npy`` calibration data, ``stats.npz``, ``ranges.json``, run configs (``.toml``) and
TensorRT calibration caches. Examples are bounded (``max_examples``) so the module runs in well under 60 s.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calib.calibrate import MAX_AMAX, MIN_AMAX, load_ranges
from calib.cli import main
from calib.config import load_config
from calib.data.arrays import NpzSource
from calib.errors import CalibError
from calib.export.trt_cache import read_cache
from calib.model import InputSpec
from calib.stats import NUM_BINS, ActivationStats, TensorHistogram

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
INPUTS = [InputSpec("x", (None, 4), np.dtype(np.float32))]


def _file(data: bytes, suffix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix="calib-fuzz-"))
    p = d / f"f{suffix}"
    p.write_bytes(data)
    return p


def _only_calib_errors(fn, *args) -> None:
    try:
        fn(*args)
    except CalibError as e:
        assert "\n" not in str(e), str(e)  # one line


def _read_npz_data(path: Path) -> None:
    src = NpzSource(path, INPUTS)
    for _ in src:
        pass


def _npy(shape, dtype, payload: bytes) -> bytes:
    b = io.BytesIO()
    np.lib.format.write_array_header_1_0(b, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                             "fortran_order": False, "shape": tuple(shape)})
    return b.getvalue() + payload


# ---- .npz / .npy calibration data ------------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=2048), st.sampled_from([".npz", ".npy"]))
def test_data_arbitrary_bytes(data, suffix):
    _only_calib_errors(_read_npz_data, _file(data, suffix))


members = st.dictionaries(
    st.sampled_from(["x", "labels", "y"]),
    st.tuples(st.lists(st.integers(-3, 9), max_size=3), st.sampled_from(["<f4", "<i8", "<u1", "<f2", "|b1", "<c8"]),
              st.binary(max_size=256)),
    max_size=3)


@FUZZ
@given(members)
def test_data_inconsistent_headers(ms):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for k, (shape, dtype, payload) in ms.items():
            zf.writestr(k + ".npy", _npy(shape, dtype, payload))
    _only_calib_errors(_read_npz_data, _file(buf.getvalue(), ".npz"))


@FUZZ
@given(st.lists(st.integers(0, 6), min_size=1, max_size=3), st.lists(st.integers(0, 8), max_size=2),
       st.sampled_from([np.float32, np.int64, np.float64]))
def test_data_well_formed_arrays_of_any_shape(xshape, lshape, ldtype):
    p = _file(b"", ".npz")
    arrays = {"x": np.zeros(xshape, np.float32)}
    if lshape:
        arrays["labels"] = np.zeros(lshape, ldtype)
    np.savez(p, **arrays)
    _only_calib_errors(_read_npz_data, p)


# ---- stats.npz ----------------------------------------------------------------------------------------------------
def _good_stats() -> dict[str, np.ndarray]:
    h = TensorHistogram()
    h.update(np.linspace(-3, 5, 101, dtype=np.float32))
    s = ActivationStats({"a": h, "b": h.merge(h)}, model_sha256="0" * 64, n_samples=3)
    return s.to_arrays()


GOOD = _good_stats()


@FUZZ
@given(st.binary(max_size=2048))
def test_stats_arbitrary_bytes(data):
    _only_calib_errors(ActivationStats.load, _file(data, ".npz"))


def _mutate(a: dict, key: str, how: str, value: float) -> dict:
    a = dict(a)
    v = a[key]
    if how == "drop":
        a.pop(key)
    elif how == "short" and v.ndim:
        a[key] = v[:-1]
    elif how == "transpose" and v.ndim == 2:
        a[key] = v.T.copy()
    elif how == "value" and v.size and v.dtype.kind in "iuf":
        w = v.copy()
        w.reshape(-1)[0] = np.array(value).astype(v.dtype) if math.isfinite(value) or v.dtype.kind == "f" else 0
        a[key] = w
    elif how == "dtype":
        a[key] = v.astype(np.float16) if v.dtype.kind in "iuf" else np.zeros(v.shape)
    elif how == "header":
        a["header"] = np.array(json.dumps({"format": "calib.stats", "version": 1, "num_bins": NUM_BINS,
                                           "n_samples": value, "sample_digest": str(value), "meta": value}))
    return a


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(sorted(GOOD)), st.sampled_from(["drop", "short", "transpose", "value",
                                                                          "dtype", "header"]),
                          st.floats(allow_nan=True, allow_infinity=True, width=32)), min_size=1, max_size=3))
def test_stats_inconsistent_members(mutations):
    a = GOOD
    for key, how, value in mutations:
        if key in a:
            a = _mutate(a, key, how, value)
    p = _file(b"", ".npz")
    np.savez(p, **a)
    try:
        s = ActivationStats.load(p)
    except CalibError as e:
        assert "\n" not in str(e)
        return
    for h in s.tensors.values():  # what loads is consistent enough to calibrate
        assert h.n >= h.n_nonfinite >= 0 and (h.pos >= 0).all() and (h.neg >= 0).all()


# ---- ranges.json ------------------------------------------------------------------------------------------------
json_values = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                           max_leaves=12)


@FUZZ
@given(st.binary(max_size=1024))
def test_ranges_arbitrary_bytes(data):
    _only_calib_errors(load_ranges, _file(data, ".json"))


@FUZZ
@given(json_values)
def test_ranges_inconsistent_json(methods):
    doc = {"format": "calib.ranges", "version": 1, "methods": methods}
    try:
        text = json.dumps(doc)
    except ValueError:
        return
    try:
        out = load_ranges(_file(text.encode(), ".json"))
    except CalibError as e:
        assert "\n" not in str(e)
        return
    for r in out.values():
        for t in r.tensors.values():
            assert MIN_AMAX <= t.amax <= MAX_AMAX and np.float32(t.scale) > 0 and math.isfinite(np.float32(t.scale))


# ---- configs ----------------------------------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=1024))
def test_config_arbitrary_bytes(data):
    _only_calib_errors(load_config, _file(data, ".toml"))


toml_scalars = st.one_of(st.integers(-5, 5).map(str), st.sampled_from(['"x"', "true", "1.5", "[1, 2]", '["a"]',
                                                                      "[]", '"entropy"', "{a = 1}", '"../x"']))


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["run", "model", "data", "calibrate", "export", "compare", "target",
                                           "sampling", "preprocess", "nope"]),
                          st.sampled_from(["name", "store", "path", "calib", "eval", "methods", "primary", "exclude",
                                           "placement", "metric", "strategy", "n", "resize", "mean", "batch_size",
                                           "html", "zzz"]), toml_scalars), max_size=6))
def test_config_inconsistent_tables(entries):
    sections: dict[str, list[str]] = {}
    for sec, key, val in entries:
        sections.setdefault(sec, []).append(f"{key} = {val}")
    text = "".join(f"[{s}]\n" + "\n".join(dict.fromkeys(body)) + "\n" for s, body in sections.items())
    _only_calib_errors(load_config, _file(text.encode(), ".toml"))


# ---- TensorRT calibration caches ---------------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=1024))
def test_cache_arbitrary_bytes(data):
    _only_calib_errors(read_cache, _file(data, ".cache"))


@FUZZ
@given(st.lists(st.tuples(st.text(max_size=6), st.text(alphabet="0123456789abcdefABCDEF:-x ", max_size=10)),
                max_size=5), st.sampled_from(["TRT-100300-EntropyCalibration2", "TRT-x", ""]))
def test_cache_inconsistent_lines(lines, header):
    text = header + "\n" + "\n".join(f"{n}: {h}" for n, h in lines)
    _only_calib_errors(read_cache, _file(text.encode(), ".cache"))


# ---- and through the CLI: exit 2, one line -------------------------------------------------------------------------
@settings(max_examples=15, deadline=None, derandomize=True)
@given(st.binary(max_size=512))
def test_cli_calibrate_on_arbitrary_bytes_exits_2(data):
    p = _file(data, ".npz")
    import contextlib

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["calibrate", str(p), "-o", str(p.parent / "r.json")])
    assert rc == 2
    assert len([ln for ln in err.getvalue().splitlines() if ln.startswith("calib: error:")]) == 1
    assert "Traceback" not in err.getvalue()
    assert not (p.parent / "r.json").exists()


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
