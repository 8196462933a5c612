"""TensorRT calibration cache: documented format, hex encoding, round trip, bad files."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from calib.calibrate.base import Ranges, TensorRange
from calib.errors import CacheFormatError
from calib.export import format_cache, hex_to_scale, parse_cache, read_cache, scale_to_hex, write_cache

BAD = Path(__file__).parent / "bad_inputs"

# Written by hand from the documented format (header, then '<tensor>: <big-endian float32 hex>'),
# not by calib's writer. Scales: 1.0, 0.5, 2.0, 1/127 rounded to float32, 0.1 rounded to float32.
HAND_WRITTEN = """TRT-100300-EntropyCalibration2
input: 3f800000
/conv1/Conv_output_0: 3f000000
relu:0: 40000000
x: 3c010204
/head/MatMul_output_0: 3dcccccd
"""


@pytest.mark.parametrize("scale, digits", [(1.0, "3f800000"), (0.5, "3f000000"), (2.0, "40000000"),
                                           (0.1, "3dcccccd"), (1 / 127, "3c010204"), (-1.0, "bf800000")])
def test_hex_encoding_known_values(scale, digits):
    assert scale_to_hex(scale) == digits
    assert hex_to_scale(digits) == np.float32(scale)
    # the same bits as packing by hand, big-endian
    assert bytes.fromhex(digits) == struct.pack(">f", scale)


def test_hand_written_fixture_reads_correctly():
    r = parse_cache(HAND_WRITTEN)
    assert list(r) == ["input", "/conv1/Conv_output_0", "relu:0", "x", "/head/MatMul_output_0"]
    assert r["input"].amax == 127.0
    assert r["/conv1/Conv_output_0"].amax == 63.5
    assert r["relu:0"].amax == 254.0  # a name holding a colon keeps it
    assert r["x"].amax == pytest.approx(1.0, rel=1e-7)
    assert r["/head/MatMul_output_0"].amax == pytest.approx(12.7, rel=1e-7)
    assert r.method == "trt-cache:EntropyCalibration2@100300"


def test_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(5)
    amax = {f"/layer{i}/out": float(a) for i, a in enumerate(rng.lognormal(0, 3, 200))}
    amax["x"] = 1.0
    ranges = Ranges("entropy", {k: TensorRange(v, "entropy") for k, v in amax.items()})
    p = write_cache(tmp_path / "model.cache", ranges)
    text = p.read_text()
    assert text.splitlines()[0] == "TRT-100300-EntropyCalibration2"
    back = read_cache(p)
    assert list(back) == list(ranges)
    for k in ranges:  # scales identical as float32, amax equal to float32 precision
        assert np.float32(back[k].amax / 127) == np.float32(ranges[k].amax / 127)
        assert back[k].amax == pytest.approx(ranges[k].amax, rel=2e-7)
    assert format_cache(back) == text  # writing what was read gives the same bytes


def test_version_and_calibrator_are_parameters():
    text = format_cache({"x": 127.0}, version=100900, calibrator="EntropyCalibration2")
    assert text == "TRT-100900-EntropyCalibration2\nx: 3f800000\n"


def test_blank_lines_and_crlf_are_accepted():
    r = parse_cache("TRT-8601-EntropyCalibration2\r\nx: 3f800000\r\n\r\n")
    assert r["x"].amax == 127.0


@pytest.mark.parametrize("case", sorted(p.name for p in BAD.glob("export_cache_*")))
def test_bad_cache_files(case):
    folder = BAD / case
    expected = (folder / "expected.txt").read_text().strip()
    with pytest.raises(CacheFormatError) as e:
        read_cache(folder / "calibration.cache")
    assert str(e.value).endswith(expected), str(e.value)


def test_binary_file_is_refused(tmp_path):
    p = tmp_path / "model.engine"
    p.write_bytes(b"\x00\xff\xfe" * 10)
    with pytest.raises(CacheFormatError, match="not a text calibration cache"):
        read_cache(p)


def test_writer_refuses_bad_amax(tmp_path):
    with pytest.raises(CacheFormatError, match="amax"):
        format_cache({"x": -1.0})
    with pytest.raises(CacheFormatError, match="amax"):
        format_cache({"x": float("nan")})
    with pytest.raises(CacheFormatError, match="line break"):
        format_cache({"a\nb": 1.0})


def test_writer_floors_tiny_scales_and_reader_accepts_them():
    # amax 0 or 1e-40 would give a float32 scale of 0 ('00000000'), which no reader accepts (issue 17)
    text = format_cache({"zero": 0.0, "denormal": 1e-40, "normal": 1.0})
    tiny = struct.pack(">f", np.finfo(np.float32).tiny).hex()
    assert tiny == "00800000"
    assert text.splitlines()[1:3] == [f"zero: {tiny}", f"denormal: {tiny}"]
    back = parse_cache(text)
    assert back["zero"].amax == pytest.approx(float(np.finfo(np.float32).tiny) * 127, rel=1e-6)
