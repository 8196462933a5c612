"""Calibration: statistics -> per-tensor INT8 ranges, every method from the same statistics.

``calibrate(stats, Entropy())`` returns ``Ranges``. Methods are small frozen
dataclasses with an ``amax(histogram)`` method; ``METHODS`` lists them by the name
used everywhere (code, CLI, reports, UI). Degenerate tensors (all zeros, only
non-finite values) get ``FALLBACK_AMAX`` and say why; no scale is ever 0 or
non-finite.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np

from calib.calibrate.base import FALLBACK_AMAX, INT8_MAX, Ranges, TensorRange
from calib.calibrate.entropy import Entropy
from calib.calibrate.minmax import MinMax
from calib.calibrate.mse import Mse
from calib.calibrate.percentile import Percentile
from calib.calibrate.weights import WeightRange, weight_axis, weight_ranges
from calib.errors import CacheFormatError, RangesError
from calib.io import write_json
from calib.stats import ActivationStats, TensorHistogram

__all__ = [
    "Method", "MinMax", "Percentile", "Entropy", "Mse", "METHODS", "parse_method", "calibrate", "calibrate_all",
    "Ranges", "TensorRange", "WeightRange", "weight_ranges", "weight_axis", "INT8_MAX", "FALLBACK_AMAX",
    "ranges_to_json", "save_ranges", "load_ranges", "RANGES_FORMAT_VERSION",
]

RANGES_FORMAT_VERSION = 1
MIN_AMAX = float(INT8_MAX * np.finfo(np.float32).tiny)  # smallest amax whose scale is a normal float32
MAX_AMAX = float(np.finfo(np.float32).max) * INT8_MAX / 2  # largest whose scale stays finite in float32
MAX_RANGES_BYTES = 1 << 28


class Method(Protocol):
    name: str

    def amax(self, h: TensorHistogram) -> float: ...

    @property
    def label(self) -> str: ...


METHODS: dict[str, type] = {"minmax": MinMax, "percentile": Percentile, "entropy": Entropy, "mse": Mse}


def parse_method(text: str) -> Method:
    """``"entropy"``, ``"minmax"``, ``"mse"``, ``"percentile"`` or ``"percentile:99.9"``."""
    name, _, arg = text.strip().partition(":")
    if name not in METHODS:
        import difflib

        close = difflib.get_close_matches(name, list(METHODS), n=1)
        raise RangesError(f"unknown calibration method '{text}' (known: {', '.join(METHODS)})",
                          hint=f"did you mean '{close[0]}'?" if close else None)
    if name == "percentile" and arg:
        try:
            p = float(arg)
        except ValueError:
            raise RangesError(f"'{text}': the percentile must be a number, e.g. percentile:99.99") from None
        return Percentile(p)
    if arg:
        raise RangesError(f"'{text}': method '{name}' takes no parameter")
    return METHODS[name]()


def _degenerate(h: TensorHistogram) -> str | None:
    if h.n == 0:
        return "no values were seen"
    if h.n_finite == 0:
        return f"all {h.n} values are NaN/inf"
    if h.max_abs == 0:
        return f"all {h.n_finite} finite values are zero"
    return None


def _memo(stats: ActivationStats) -> dict:
    """Each (method, tensor)'s amax computed from these statistics so far: a run calibrates the same tensors by
    the same methods more than once (every method, then auto's candidates); emptied when the samples change."""
    version = (stats.n_samples, stats.sample_digest, len(stats.tensors))
    memo = stats.__dict__.get("_amax_memo")
    if memo is None or memo[0] != version:
        memo = (version, {})
        stats.__dict__["_amax_memo"] = memo
    return memo[1]


def calibrate(stats: ActivationStats, method: Method | str, tensors: Iterable[str] | None = None) -> Ranges:
    """Per-tensor ranges of ``stats`` by ``method`` (no second pass over data)."""
    m = parse_method(method) if isinstance(method, str) else method
    names = list(stats.tensors) if tensors is None else list(tensors)
    out: dict[str, TensorRange] = {}
    memo = _memo(stats)
    for name in names:
        h = stats[name]
        why = _degenerate(h)
        key = (m, name, id(h), h.n)
        if not why and key not in memo:
            memo[key] = float(m.amax(h))
        amax = 0.0 if why else memo[key]
        if not why and not amax > 0:
            # e.g. percentile inside a spike at zero: keep the range of the data instead of 0
            amax, why = h.max_abs, f"{m.label} gave 0; used max|x|"
        if why and not amax > 0:
            amax = FALLBACK_AMAX
        if amax < MIN_AMAX:  # e.g. denormal activations: amax/127 would round to a zero float32 scale
            amax, why = MIN_AMAX, why or f"{m.label} gave amax {amax:.3g}; floored to the smallest float32 scale"
        out[name] = TensorRange(amax, m.label, why)
    return Ranges(m.label, out, stats.model_sha256)


def calibrate_all(stats: ActivationStats, methods: Iterable[Method | str] | None = None) -> dict[str, Ranges]:
    """Ranges of every method (default: all four), keyed by method label."""
    ms = [parse_method(x) if isinstance(x, str) else x for x in (methods or list(METHODS))]
    result = {}
    for m in ms:
        r = calibrate(stats, m)
        result[r.method] = r
    return result


def ranges_to_json(ranges: dict[str, Ranges], weights: dict[str, WeightRange] | None = None,
                   stats: ActivationStats | None = None) -> dict:
    """The documented ``ranges.json`` document (see README, "ranges.json")."""
    doc: dict = {"format": "calib.ranges", "version": RANGES_FORMAT_VERSION,
                 "model_sha256": next((r.model_sha256 for r in ranges.values()), ""),
                 "n_samples": stats.n_samples if stats else None, "methods": {}}
    for label, r in ranges.items():
        doc["methods"][label] = {
            t: {"amax": tr.amax, "scale": tr.scale, **({"degenerate": tr.degenerate} if tr.degenerate else {})}
            for t, tr in r.tensors.items()}
    if weights is not None:
        doc["weights"] = {
            node: {"tensor": w.tensor, "axis": w.axis, "amax": [float(a) for a in w.amax],
                   "scale": [float(s) for s in w.scale], "zero_channels": w.zero_channels}
            for node, w in weights.items()}
    return doc


def save_ranges(path: str | Path, ranges: dict[str, Ranges], weights=None, stats=None) -> Path:
    return write_json(path, ranges_to_json(ranges, weights, stats))


def load_ranges(path: str | Path) -> dict[str, Ranges]:
    """Read ``ranges.json`` back into ``{method: Ranges}``; every amax is checked (finite, and its scale
    amax/127 a normal float32) before anything is built from it."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_RANGES_BYTES:
            raise CacheFormatError(f"{path}: {path.stat().st_size} bytes, more than a ranges file holds")
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CacheFormatError(f"{path}: no such ranges file") from None
    except IsADirectoryError:
        raise CacheFormatError(f"{path}: is a folder, expected ranges.json") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CacheFormatError(f"{path}: not valid JSON (UTF-8 expected; {str(e)[:120]})") from None
    if not isinstance(doc, dict) or doc.get("format") != "calib.ranges" or not isinstance(doc.get("methods"), dict):
        raise CacheFormatError(f"{path}: not a calib ranges file (expected format 'calib.ranges')")
    sha = doc.get("model_sha256", "")
    out = {}
    for label, tensors in doc["methods"].items():
        if not isinstance(tensors, dict):
            raise CacheFormatError(f"{path}: method '{label}': expected an object of tensor -> {{amax}}")
        out[label] = Ranges(label, {t: _tensor_range(path, label, t, v) for t, v in tensors.items()},
                            sha if isinstance(sha, str) else "")
    return out


def _tensor_range(path: Path, label: str, tensor: str, v: object) -> TensorRange:
    amax = v.get("amax") if isinstance(v, dict) else None
    if isinstance(amax, bool) or not isinstance(amax, (int, float)):
        raise CacheFormatError(f"{path}: method '{label}', tensor '{tensor}': expected {{\"amax\": number}}")
    if not MIN_AMAX <= amax <= MAX_AMAX:
        raise CacheFormatError(f"{path}: method '{label}', tensor '{tensor}': amax {amax} gives no usable "
                               f"float32 scale (amax must be in [{MIN_AMAX:.3g}, {MAX_AMAX:.3g}])")
    why = v.get("degenerate")
    return TensorRange(float(amax), label, why if isinstance(why, str) else None)
