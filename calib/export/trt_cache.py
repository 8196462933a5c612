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

Every scale is floored at the smallest positive normal float32
(``np.finfo(np.float32).tiny``): a tensor whose values are all below ~1e-38
would otherwise get scale 0 (``00000000``), which no reader accepts.

``cache_from_model`` builds the cache that describes a written Q/DQ model: the
scale of each activation's QuantizeLinear, the other tensors' ranges implicit
INT8 needs, and no entry for the inputs of nodes the model keeps in float on
purpose (so TensorRT <= 10 keeps those layers in high precision too) or for
tensors the placement skipped.

TensorRT 11 has no implicit INT8 path: build from the Q/DQ ONNX there.
"""

from __future__ import annotations

import math
import os
import re
import struct
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from calib.calibrate.base import INT8_MAX, Ranges, TensorRange
from calib.errors import CacheFormatError
from calib.graph import is_precision_cast
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
    "TINY_SCALE",
    "qdq_activation_scales",
    "cache_from_model",
    "format_scales",
    "model_cache",
    "read_any_cache",
]

TINY_SCALE = float(np.finfo(np.float32).tiny)

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
    scales = {}
    for name, r in ranges.items():
        amax = float(getattr(r, "amax", r))
        if not (math.isfinite(amax) and amax >= 0):
            raise CacheFormatError(f"tensor '{name}': amax {amax} cannot go into a calibration cache (needs >= 0)")
        scales[name] = amax / INT8_MAX
    return format_scales(scales, version=version, calibrator=calibrator)


def format_scales(scales: Mapping[str, float], *, version: int = DEFAULT_TRT_VERSION,
                  calibrator: str = DEFAULT_CALIBRATOR) -> str:
    """Text of a calibration cache from tensor -> scale (each floored at ``TINY_SCALE``), in the given order."""
    lines = [f"TRT-{int(version)}-{calibrator}"]
    for name, scale in scales.items():
        if not (math.isfinite(scale) and scale >= 0):
            raise CacheFormatError(f"tensor '{name}': scale {scale} cannot go into a calibration cache")
        if "\n" in name:
            raise CacheFormatError(f"tensor name {name!r} holds a line break; the cache format cannot store it")
        lines.append(f"{name}: {scale_to_hex(max(float(np.float32(scale)), TINY_SCALE))}")
    return "\n".join(lines) + "\n"


def write_cache(path: str | os.PathLike, ranges: Mapping[str, TensorRange] | Mapping[str, float], *,
                version: int = DEFAULT_TRT_VERSION, calibrator: str = DEFAULT_CALIBRATOR,
                scales: bool = False) -> Path:
    """Write the cache atomically; ``scales=True``: ``ranges`` maps tensor -> scale (e.g. ``cache_from_model``)."""
    text = format_scales(ranges, version=version, calibrator=calibrator) if scales else \
        format_cache(ranges, version=version, calibrator=calibrator)
    return write_text(path, text)


def _origin(name: str, producer: Mapping[str, onnx.NodeProto]) -> str:
    """Follow precision Casts back (an FP16 model casts graph inputs before their Q): the FP32 tensor name."""
    seen = set()
    while name in producer and is_precision_cast(producer[name]) and name not in seen:
        seen.add(name)
        name = producer[name].input[0]
    return name


def qdq_activation_scales(proto: onnx.ModelProto) -> dict[str, float]:
    """FP32 tensor name -> the scale of its QuantizeLinear in a written Q/DQ model (activations only).

    Weights (a QuantizeLinear of an initializer, or int8 initializers behind a
    DequantizeLinear) are left out; per-axis activation scales are refused.
    """
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    out: dict[str, float] = {}
    for n in g.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in inits or n.input[0] in consts:
            continue
        if n.input[1] in inits:
            arr = numpy_helper.to_array(inits[n.input[1]])
        elif n.input[1] in consts:
            arr = numpy_helper.to_array(consts[n.input[1]].attribute[0].t)
        else:
            raise CacheFormatError(f"QuantizeLinear '{n.name}': scale '{n.input[1]}' is not a constant")
        if arr.size != 1:
            raise CacheFormatError(f"QuantizeLinear '{n.name}': {arr.size} scales for activation '{n.input[0]}'; "
                                   "a calibration cache holds one scale per tensor")
        out.setdefault(_origin(n.input[0], producer), float(np.asarray(arr, dtype=np.float32).reshape(-1)[0]))
    return out


def _float_inputs(proto: onnx.ModelProto, float_nodes: Iterable[str]) -> set[str]:
    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    wanted = set(float_nodes)
    return {_origin(i, producer) for n in g.node if n.name in wanted for i in n.input if i}


def cache_from_model(proto: onnx.ModelProto, tensors: Iterable[str], ranges: Mapping[str, TensorRange] | None, *,
                     float_nodes: Iterable[str] = (), skipped: Iterable[str] = ()) -> dict[str, float]:
    """Tensor -> scale of the cache describing the written Q/DQ model ``proto``.

    ``tensors``: the FP32 model's activation tensors in order (graph inputs,
    then node outputs). A tensor quantized in ``proto`` gets its
    QuantizeLinear's scale; the input of a node in ``float_nodes`` (kept in
    float on purpose) and a ``skipped`` tensor get no entry; any other tensor
    keeps its range from ``ranges`` (implicit INT8 needs layer outputs too).
    """
    quantized = qdq_activation_scales(proto)
    drop = (_float_inputs(proto, float_nodes) | set(skipped)) - set(quantized)
    out: dict[str, float] = {}
    for t in tensors:
        if t in quantized:
            out[t] = max(quantized[t], TINY_SCALE)
        elif t not in drop and ranges is not None and t in ranges:
            out[t] = max(float(ranges[t].amax) / INT8_MAX, TINY_SCALE)
    return out


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


def model_cache(qdq, fp32_model, ranges: Mapping[str, TensorRange] | None) -> dict[str, float]:
    """``cache_from_model`` for a ``QdqModel`` (possibly cast by ``calib.export.precision``) of ``fp32_model``.

    The pipeline calls this after export/advise/bias correction with the ranges
    the model was exported from; write the result with ``write_cache(path, scales, scales=True)``.
    """
    g = fp32_model.graph
    inits = {t.name for t in g.initializer}
    tensors = [i.name for i in g.input if i.name not in inits] + [o for n in g.node for o in n.output if o]
    return cache_from_model(qdq.model, tensors, ranges, float_nodes=qdq.excluded, skipped=qdq.skipped)


# ---------------------------------------------------------------- other writers' caches


def _ort_text(text: str, source: str) -> Ranges:
    """ONNX Runtime ``write_calibration_table``'s calibration.cache: '<tensor> <amax as a Python float>' lines."""
    tensors: dict[str, TensorRange] = {}
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        name, sep, value = line.rstrip().rpartition(" ")
        try:
            amax = float(value)
        except ValueError:
            amax = float("nan")
        if not sep or not name or not (math.isfinite(amax) and amax >= 0):
            raise CacheFormatError(f"{source} line {i}: expected '<tensor> <amax>' (ONNX Runtime calibration "
                                   f"table), got {line[:80]!r}")
        tensors[name] = TensorRange(amax=max(amax, TINY_SCALE * INT8_MAX), method="ort-cache")
    return Ranges(method="ort-cache", tensors=tensors)


def _ort_json(text: str, source: str) -> Ranges:
    """ONNX Runtime's calibration.json: tensor -> {"lowest": .., "highest": ..} (numbers or numpy-array dicts)."""
    import json

    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise CacheFormatError(f"{source}: not JSON ({e.msg} at line {e.lineno})") from None
    tensors: dict[str, TensorRange] = {}
    for name, d in doc.items():
        vals = []
        for k in ("lowest", "highest"):
            v = d.get(k) if isinstance(d, dict) else None
            v = v.get("data") if isinstance(v, dict) else v
            if v is not None:
                vals.extend(np.abs(np.asarray(v, dtype=np.float64)).reshape(-1).tolist())
        if not vals or not all(math.isfinite(v) for v in vals):
            raise CacheFormatError(f"{source}: tensor '{name}' has no finite lowest/highest")
        tensors[name] = TensorRange(amax=max(max(vals), TINY_SCALE * INT8_MAX), method="ort-cache")
    return Ranges(method="ort-cache", tensors=tensors)


def _ort_flatbuffers(raw: bytes, source: str) -> Ranges:
    """ONNX Runtime's calibration.flatbuffers (TrtTable of key -> str(amax)), read with ORT's own schema classes."""
    from onnxruntime.quantization.CalTableFlatBuffers import TrtTable  # optional reader (needs flatbuffers)

    try:
        table = TrtTable.TrtTable.GetRootAsTrtTable(raw, 0)
        pairs = [(table.Dict(i).Key().decode(), table.Dict(i).Value().decode()) for i in range(table.DictLength())]
    except Exception as e:  # flatbuffers raises struct/index errors on foreign bytes
        raise CacheFormatError(f"{source}: not a calibration table ({type(e).__name__})") from None
    return _ort_text("\n".join(f"{k} {v}" for k, v in pairs), source)


def read_any_cache(path: str | os.PathLike) -> Ranges:
    """Read a TensorRT cache (also what ModelOpt reads/writes) or ONNX Runtime's calibration table
    (calibration.cache text, calibration.json or calibration.flatbuffers); the format is detected."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CacheFormatError(f"{path}: cannot read the calibration cache ({e.strerror})") from None
    if b"\x00" in raw:  # text caches hold no NUL; FlatBuffers tables always do (offsets)
        return _ort_flatbuffers(raw, str(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return _ort_flatbuffers(raw, str(path))
    head = text.lstrip()[:1]
    if text.startswith("TRT-"):
        return parse_cache(text, source=str(path))
    if head == "{":
        return _ort_json(text, str(path))
    if not text.strip():
        raise CacheFormatError(f"{path}: the file is empty")
    return _ort_text(text, str(path))
