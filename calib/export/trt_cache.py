"""TensorRT calibration cache: writer and reader.

Format (text, as written by TensorRT's ``IInt8EntropyCalibrator2`` and read by
TensorRT <= 10.x implicit INT8 and ``trtexec --int8 --calib=FILE``)::

    TRT-100300-EntropyCalibration2
    x: 3c010a14
    /conv1/Conv_output_0: 3d4ccccd

The header names the TensorRT version (``NV_TENSORRT_VERSION``: major*10000 +
minor*100 + patch for TensorRT 10, so 10.3.0 is 100300) and the calibrator.
Each line is ``<tensor>: <scale>`` where the scale (amax / 127) is the IEEE-754
float32 bit pattern, big-endian, as 8 lower-case hex digits: scale 1.0 is
``3f800000``. Tensor names are the ONNX tensor names of the FP32 model
(TensorRT's ONNX parser keeps them), network inputs included.

TensorRT 11 has no implicit INT8 path: build from the Q/DQ ONNX there.
"""

from __future__ import annotations

import math
import os
import re
import struct
from pathlib import Path
from typing import Mapping

from calib.calibrate.base import INT8_MAX, Ranges, TensorRange
from calib.errors import CacheFormatError
from calib.io import write_text

__all__ = [
    "DEFAULT_TRT_VERSION",
    "DEFAULT_CALIBRATOR",
    "scale_to_hex",
    "hex_to_scale",
    "format_cache",
    "write_cache",
    "parse_cache",
    "read_cache",
]

# TensorRT 10.3.0 (NV_TENSORRT_VERSION = 10*10000 + 3*100 + 0), a TensorRT 10.x GA release.
# TensorRT may refuse a cache whose header names another version: pass the version you build with.
DEFAULT_TRT_VERSION = 100300
DEFAULT_CALIBRATOR = "EntropyCalibration2"
_HEADER = re.compile(r"^TRT-(\d+)-(\w+)$")
_HEX = re.compile(r"^[0-9a-fA-F]{8}$")


def scale_to_hex(scale: float) -> str:
    """float32 bit pattern of ``scale``, big-endian, 8 lower-case hex digits (1.0 -> '3f800000')."""
    return struct.pack(">f", scale).hex()


def hex_to_scale(digits: str) -> float:
    """Inverse of ``scale_to_hex``."""
    return struct.unpack(">f", bytes.fromhex(digits))[0]


def format_cache(ranges: Mapping[str, TensorRange] | Mapping[str, float], *, version: int = DEFAULT_TRT_VERSION,
                 calibrator: str = DEFAULT_CALIBRATOR) -> str:
    """Text of a calibration cache for ``ranges`` (tensor -> TensorRange or amax), in the given order."""
    lines = [f"TRT-{int(version)}-{calibrator}"]
    for name, r in ranges.items():
        amax = float(getattr(r, "amax", r))
        if not (math.isfinite(amax) and amax > 0):
            raise CacheFormatError(f"tensor '{name}': amax {amax} cannot go into a calibration cache (needs > 0)")
        if "\n" in name:
            raise CacheFormatError(f"tensor name {name!r} holds a line break; the cache format cannot store it")
        lines.append(f"{name}: {scale_to_hex(amax / INT8_MAX)}")
    return "\n".join(lines) + "\n"


def write_cache(path: str | os.PathLike, ranges: Mapping[str, TensorRange] | Mapping[str, float], *,
                version: int = DEFAULT_TRT_VERSION, calibrator: str = DEFAULT_CALIBRATOR) -> Path:
    """Write the cache atomically."""
    return write_text(path, format_cache(ranges, version=version, calibrator=calibrator))


def parse_cache(text: str, *, source: str = "calibration.cache", method: str = "trt-cache") -> Ranges:
    """Parse cache text into Ranges (amax = scale * 127); errors name the line.

    The header's version and calibrator are stored in ``Ranges.method`` as
    ``trt-cache:<calibrator>@<version>`` unless ``method`` is given otherwise.
    """
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise CacheFormatError(f"{source} line 1: expected a header like 'TRT-{DEFAULT_TRT_VERSION}-"
                               f"{DEFAULT_CALIBRATOR}', got an empty line" if lines else f"{source}: the file is empty",
                               hint="is this a TensorRT calibration cache?")
    m = _HEADER.match(lines[0].strip())
    if m is None:
        raise CacheFormatError(f"{source} line 1: expected a header like 'TRT-{DEFAULT_TRT_VERSION}-"
                               f"{DEFAULT_CALIBRATOR}', got {lines[0][:80]!r}",
                               hint="is this a TensorRT calibration cache?")
    label = f"{method}:{m.group(2)}@{m.group(1)}" if method == "trt-cache" else method
    tensors: dict[str, TensorRange] = {}
    for i, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name, sep, digits = line.rpartition(":")
        name, digits = name.strip(), digits.strip()
        if not sep or not name or not _HEX.match(digits):
            raise CacheFormatError(f"{source} line {i}: expected '<tensor>: <8 hex digits>', got {line[:80]!r}")
        scale = hex_to_scale(digits)
        if not (math.isfinite(scale) and scale > 0):
            raise CacheFormatError(f"{source} line {i}: tensor '{name}' has scale {scale} ({digits}); "
                                   "expected a finite scale > 0")
        if name in tensors:
            raise CacheFormatError(f"{source} line {i}: tensor '{name}' appears twice")
        tensors[name] = TensorRange(amax=scale * INT8_MAX, method=label)
    return Ranges(method=label, tensors=tensors)


def read_cache(path: str | os.PathLike, *, method: str = "trt-cache") -> Ranges:
    """Read a cache file (errors name the file and line)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CacheFormatError(f"{path}: cannot read the calibration cache ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CacheFormatError(f"{path}: not a text calibration cache (byte {e.start} is not UTF-8)",
                               hint="TensorRT caches are text; is this an engine or a FlatBuffers table?") from None
    return parse_cache(text, source=str(path), method=method)
