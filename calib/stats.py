"""Mergeable activation statistics: the contract between collection and calibration.

Per tensor, a ``TensorHistogram`` keeps the exact count, min, max and
non-finite count, and a histogram of |x| with ``NUM_BINS`` = 32,768 bins on a
grid anchored at 0 whose bin width is a power of two, split by sign (``pos`` for
x >= 0, ``neg`` for x < 0; the |x| histogram is their sum).

Why powers of two: the width is a function of the largest |x| seen only (the
smallest 2**e with max|x| < NUM_BINS * 2**e). Growing the range doubles the width
and adds neighbouring bins pairwise, and floor(floor(|x|/w)/2) == floor(|x|/2w)
exactly, so binning at a fine width and merging later equals binning at the
final width. Hence shards collected apart, in any order and any batch split,
merge bit for bit into what one pass gives. Non-finite values are counted and
left out of the histogram and of min/max.

Why 32,768 bins: TensorRT's entropy calibration (pytorch-quantization) searches
a histogram of 2,048 *linear* bins over [0, max|x|]. ``linear_abs_counts``
re-bins this grid onto that one (values taken as uniform within a fine bin);
max|x| lies in the upper half of the grid, so every linear bin spans 8 to 16
fine bins and the re-binned counts, and hence entropy's amax, follow the data
when it is scaled by any factor, not only by powers of two.

Memory is constant in the number of samples: 2 x 32,768 int32 counts (256 KiB)
per tensor, int64 (512 KiB) once a tensor has seen 2**31 values; ``.npz`` files
store them compressed (empty bins cost almost nothing).
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from calib._kernels import downsample, fold, fold_finite
from calib.errors import CacheFormatError, RangesError
from calib.io import atomic_path
from calib.errors import InputDataError
from calib.io import read_npz

__all__ = ["NUM_BINS", "MIN_EXP", "TensorHistogram", "ActivationStats", "STATS_FORMAT_VERSION", "width_exponent",
           "LOG2_BINS", "LINEAR_BINS"]

LOG2_BINS = 15  # calib._kernels has the same constant
NUM_BINS = 1 << LOG2_BINS
LINEAR_BINS = 2048  # pytorch-quantization's histogram (TENSORRT.md section 1)
MIN_EXP = -126  # widths below 2**-126 are pointless for float32 activations
_INT32_COUNTS = 2 ** 31 - 1  # counts are int32 up to this many values per tensor
STATS_FORMAT_VERSION = 2  # 2: 32,768 bins (version 1 had 2,048; not readable, collect again)
_MAGIC = "calib.stats"
MAX_STATS_BYTES = 1 << 33  # 8 GiB: 250 000 tensors; a file declaring more is refused before it is read


def width_exponent(max_abs: float) -> int:
    """Smallest e >= MIN_EXP with max_abs < NUM_BINS * 2**e (the grid for a given range)."""
    if max_abs <= 0:
        return MIN_EXP
    _, ex = math.frexp(max_abs)  # max_abs = m * 2**ex, 0.5 <= m < 1
    return max(MIN_EXP, ex - LOG2_BINS)


@dataclass
class TensorHistogram:
    """Exact, mergeable statistics of one tensor (see module doc)."""

    # int32 while fewer than 2**31 values were seen (no bin can then overflow), int64 after
    pos: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BINS, np.int32))
    neg: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BINS, np.int32))
    exp: int = MIN_EXP
    min: float = math.inf
    max: float = -math.inf
    n: int = 0
    n_nonfinite: int = 0

    # ---- derived -----------------------------------------------------------
    @property
    def bin_width(self) -> float:
        return math.ldexp(1.0, self.exp)

    @property
    def n_finite(self) -> int:
        return self.n - self.n_nonfinite

    @property
    def max_abs(self) -> float:
        if self.n_finite == 0:
            return 0.0
        return max(abs(self.min), abs(self.max))

    def abs_counts(self) -> np.ndarray:
        """The |x| histogram: ``NUM_BINS`` int64 counts, bin k = [k*w, (k+1)*w)."""
        return self.pos + self.neg

    def linear_abs_counts(self, num_bins: int = LINEAR_BINS) -> tuple[np.ndarray, float]:
        """The |x| histogram re-binned to ``num_bins`` linear bins over [0, max|x|]: (float64 counts, width).

        What ``np.histogram(|x|, num_bins, (0, max|x|))`` gives on the raw values, up to where values lie
        inside a fine bin: each fine bin's count is spread uniformly over it (the last occupied one over
        [its lower edge, max|x|]), i.e. the cumulative count is interpolated linearly. Empty when max|x| = 0.
        """
        counts = self.abs_counts()
        nz = np.flatnonzero(counts)
        if nz.size == 0 or not self.max_abs > 0:
            return np.zeros(num_bins), 0.0
        n = int(nz[-1]) + 1
        cum = np.zeros(n + 1)
        np.cumsum(counts[:n], out=cum[1:])
        xp = np.arange(n + 1, dtype=np.float64) * self.bin_width
        xp[n] = self.max_abs  # the values of the last bin lie in [(n-1) w, max|x|]
        width = self.max_abs / num_bins
        at = np.interp(np.arange(num_bins + 1, dtype=np.float64) * width, xp, cum)
        at[0], at[-1] = 0.0, cum[n]  # the range ends exactly at max|x| (and 0 * width is 0)
        return np.maximum(np.diff(at), 0.0), width

    def edges(self) -> np.ndarray:
        return np.arange(NUM_BINS + 1, dtype=np.float64) * self.bin_width

    def clipped_fraction(self, amax: float) -> float:
        """Fraction of finite values with |x| > amax (bin resolution; bins past amax count whole)."""
        if self.n_finite == 0:
            return 0.0
        k = int(math.ceil(amax / self.bin_width))
        return float(self.abs_counts()[k:].sum()) / self.n_finite

    # ---- update / merge ------------------------------------------------------
    def update(self, x: np.ndarray) -> None:
        """Fold a batch of values into the statistics (any shape, any float dtype)."""
        a = np.asarray(x)
        if a.dtype == np.float16 or a.dtype.kind != "f":
            a = a.astype(np.float32)
        a = np.ascontiguousarray(a).reshape(-1)
        if a.size == 0:
            return
        if self.n + a.size > _INT32_COUNTS and self.pos.dtype != np.int64:
            self.pos, self.neg = self.pos.astype(np.int64), self.neg.astype(np.int64)
        mn, mx = float(a.min()), float(a.max())  # NaN if any value is NaN
        if math.isfinite(mn) and math.isfinite(mx):
            # fast path (no NaN/inf): grow the grid once to this batch's max|x|, then bin branch-free.
            # Same result as growing value by value: downsampling commutes with binning.
            e = max(self.exp, width_exponent(max(-mn, mx)))
            if e > self.exp:
                downsample(self.pos, e - self.exp)
                downsample(self.neg, e - self.exp)
                self.exp = e
            inv = math.ldexp(1.0, -e)
            top = min(NUM_BINS, int(max(-mn, mx) * inv) + 1)  # bins this batch reaches
            fold_finite(a, self.pos, self.neg, np.float32(inv) if a.dtype == np.float32 and e <= 126 else inv, top)
            self.n += int(a.size)
            self.min = min(self.min, mn)
            self.max = max(self.max, mx)
            return
        exp, mn, mx, nnf = fold(a, self.pos, self.neg, self.exp, self.n_finite > 0)
        self.exp = int(exp)
        self.n += int(a.size)
        self.n_nonfinite += int(nnf)
        if nnf < a.size:
            self.min = min(self.min, float(mn))
            self.max = max(self.max, float(mx))

    def merge(self, other: "TensorHistogram") -> "TensorHistogram":
        """Pure: the statistics of both inputs together (exact, associative, commutative)."""
        e = max(self.exp, other.exp)
        out = TensorHistogram(exp=e, min=min(self.min, other.min), max=max(self.max, other.max),
                              n=self.n + other.n, n_nonfinite=self.n_nonfinite + other.n_nonfinite)
        if out.n > _INT32_COUNTS:
            out.pos, out.neg = out.pos.astype(np.int64), out.neg.astype(np.int64)
        for src in (self, other):
            p, q = src.pos.copy(), src.neg.copy()
            if src.exp < e:
                downsample(p, e - src.exp)
                downsample(q, e - src.exp)
            out.pos += p
            out.neg += q
        return out

    def equals(self, other: "TensorHistogram") -> bool:
        return (self.exp == other.exp and self.n == other.n and self.n_nonfinite == other.n_nonfinite
                and _same_float(self.min, other.min) and _same_float(self.max, other.max)
                and np.array_equal(self.pos, other.pos) and np.array_equal(self.neg, other.neg))


def _check_header(a: dict[str, np.ndarray], source: str) -> dict:
    h = a.get("header")
    try:
        header = json.loads(str(h[()])) if h is not None and h.dtype.kind == "U" and h.shape == () else None
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise CacheFormatError(f"{source}: not a calib statistics file (no header)")
    if header.get("format") != _MAGIC:
        raise CacheFormatError(f"{source}: not a calib statistics file (format {header.get('format')!r})")
    if header.get("version") != STATS_FORMAT_VERSION:
        raise CacheFormatError(f"{source}: statistics format version {header.get('version')}, this calib reads "
                               f"version {STATS_FORMAT_VERSION}", hint="collect the statistics again")
    if header.get("num_bins") != NUM_BINS:
        raise CacheFormatError(f"{source}: {header.get('num_bins')} bins, expected {NUM_BINS}")
    out = {"model_sha256": header.get("model_sha256", ""), "n_samples": header.get("n_samples", 0),
           "meta": header.get("meta", {})}
    try:
        out["sample_digest"] = int(header.get("sample_digest", "0"))
    except (TypeError, ValueError):
        out["sample_digest"] = -1
    bad = [k for k, ok in (("model_sha256", isinstance(out["model_sha256"], str)),
                           ("n_samples", type(out["n_samples"]) is int and out["n_samples"] >= 0),
                           ("sample_digest", 0 <= out["sample_digest"] < 1 << 64),
                           ("meta", isinstance(out["meta"], dict))) if not ok]
    if bad:
        raise CacheFormatError(f"{source}: bad header field '{bad[0]}' ({header.get(bad[0])!r})")
    return out


_COLUMNS = {"pos": "iu", "neg": "iu", "exp": "iu", "min": "fiu", "max": "fiu", "n": "iu", "n_nonfinite": "iu"}


def _check_columns(a: dict[str, np.ndarray], source: str) -> tuple[list[str], dict[str, np.ndarray]]:
    names_a = a.get("names")
    if names_a is None or names_a.ndim != 1 or (names_a.size and names_a.dtype.kind != "U"):
        raise CacheFormatError(f"{source}: 'names' is missing or not a list of tensor names")
    names, t = [str(x) for x in names_a], len(names_a)
    if len(set(names)) != t:
        raise CacheFormatError(f"{source}: 'names' lists a tensor twice")
    cols = {}
    for key, kinds in _COLUMNS.items():
        c = a.get(key)
        shape = (t, NUM_BINS) if key in ("pos", "neg") else (t,)
        if c is None or c.shape != shape or (c.size and c.dtype.kind not in kinds):
            got = "missing" if c is None else f"shape {c.shape} {c.dtype}"
            raise CacheFormatError(f"{source}: '{key}' is {got}, expected shape {shape} for {t} tensor(s)")
        cols[key] = c.astype(np.float64, copy=False) if key in ("min", "max") else c.astype(np.int64, copy=False)
    for i, name in enumerate(names):
        why = _bad_tensor(cols, i)
        if why:
            raise CacheFormatError(f"{source}: tensor '{name}': {why}")
    return names, cols


def _bad_tensor(c: dict[str, np.ndarray], i: int) -> str:
    n, nnf = int(c["n"][i]), int(c["n_nonfinite"][i])
    if n < 0 or not 0 <= nnf <= n:
        return f"bad counts n={n}, n_nonfinite={nnf}"
    if (c["pos"][i] < 0).any() or (c["neg"][i] < 0).any():
        return "negative histogram counts"
    if not MIN_EXP <= int(c["exp"][i]) <= 1100:
        return f"bin width exponent {int(c['exp'][i])} out of range"
    lo, hi = float(c["min"][i]), float(c["max"][i])
    if n > nnf and not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        return f"bad range min={lo}, max={hi}"
    return ""


def _same_float(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _sample_digest(ids: Iterable[str]) -> int:
    """Order-independent digest of sample ids: sum of 64-bit hashes mod 2**64 (mergeable)."""
    total = 0
    for i in ids:
        total = (total + int.from_bytes(hashlib.sha256(i.encode()).digest()[:8], "little")) % (1 << 64)
    return total


@dataclass
class ActivationStats:
    """Statistics of every collected tensor of one model, plus provenance.

    ``merge`` is exact; ``save``/``load`` round-trip bit for bit through ``.npz``.
    """

    tensors: dict[str, TensorHistogram] = field(default_factory=dict)
    model_sha256: str = ""
    n_samples: int = 0
    sample_digest: int = 0
    meta: dict = field(default_factory=dict)  # shapes, dtypes, input names: JSON-able only

    def add_samples(self, ids: Iterable[str]) -> None:
        ids = list(ids)
        self.n_samples += len(ids)
        self.sample_digest = (self.sample_digest + _sample_digest(ids)) % (1 << 64)

    def __getitem__(self, name: str) -> TensorHistogram:
        try:
            return self.tensors[name]
        except KeyError:
            raise RangesError(f"no statistics for tensor '{name}'",
                              hint="collect statistics again for this model") from None

    def merge(self, other: "ActivationStats") -> "ActivationStats":
        if self.model_sha256 and other.model_sha256 and self.model_sha256 != other.model_sha256:
            raise RangesError("cannot merge statistics of different models "
                              f"(sha256 {self.model_sha256[:12]}… vs {other.model_sha256[:12]}…)")
        if set(self.tensors) != set(other.tensors):
            only = sorted(set(self.tensors) ^ set(other.tensors))[:3]
            raise RangesError(f"cannot merge statistics over different tensors (e.g. {only})")
        merged = {k: self.tensors[k].merge(other.tensors[k]) for k in self.tensors}
        return ActivationStats(merged, self.model_sha256 or other.model_sha256, self.n_samples + other.n_samples,
                               (self.sample_digest + other.sample_digest) % (1 << 64), dict(self.meta))

    def equals(self, other: "ActivationStats") -> bool:
        return (list(self.tensors) == list(other.tensors) and self.n_samples == other.n_samples
                and self.sample_digest == other.sample_digest and self.model_sha256 == other.model_sha256
                and all(self.tensors[k].equals(other.tensors[k]) for k in self.tensors))

    # ---- persistence ---------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        names = list(self.tensors)
        hs = [self.tensors[k] for k in names]
        counts = np.int32 if all(h.n <= _INT32_COUNTS for h in hs) else np.int64
        header = {"format": _MAGIC, "version": STATS_FORMAT_VERSION, "model_sha256": self.model_sha256,
                  "n_samples": self.n_samples, "sample_digest": str(self.sample_digest), "num_bins": NUM_BINS,
                  "meta": self.meta}
        return {
            "header": np.array(json.dumps(header, sort_keys=True)),
            "names": np.array(names, dtype=str) if names else np.zeros(0, dtype="<U1"),
            # int32 while every count fits (the reader widens to int64): half the bytes to ship and compress
            "pos": np.stack([h.pos for h in hs]).astype(counts, copy=False) if hs else np.zeros((0, NUM_BINS), counts),
            "neg": np.stack([h.neg for h in hs]).astype(counts, copy=False) if hs else np.zeros((0, NUM_BINS), counts),
            "exp": np.array([h.exp for h in hs], np.int64),
            "min": np.array([h.min for h in hs], np.float64),
            "max": np.array([h.max for h in hs], np.float64),
            "n": np.array([h.n for h in hs], np.int64),
            "n_nonfinite": np.array([h.n_nonfinite for h in hs], np.int64),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_path(path, suffix=".npz") as tmp:  # a .npz at deflate level 1: most bins are empty
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
                for key, value in self.to_arrays().items():
                    with z.open(f"{key}.npy", "w", force_zip64=True) as f:
                        np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ActivationStats":
        """Read a statistics file: every member's declared size is checked before it is decompressed, then
        every field is validated (a bad file raises ``CacheFormatError`` naming it, never another error)."""
        path = Path(path)
        if not path.is_file():
            raise CacheFormatError(f"{path}: no such statistics file" if not path.exists() else
                                   f"{path}: is not a file", hint="run 'calib collect' first")
        try:
            arrays = read_npz(path, max_member_bytes=MAX_STATS_BYTES, max_total_bytes=MAX_STATS_BYTES)
        except InputDataError as e:
            raise CacheFormatError(f"not a calib statistics file: {e}") from None
        return cls.from_arrays(arrays, source=str(path))

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray], source: str = "statistics") -> "ActivationStats":
        header = _check_header(a, source)
        names, cols = _check_columns(a, source)
        tensors = {}
        for i, name in enumerate(names):
            tensors[name] = TensorHistogram(
                pos=cols["pos"][i].copy(), neg=cols["neg"][i].copy(), exp=int(cols["exp"][i]),
                min=float(cols["min"][i]), max=float(cols["max"][i]), n=int(cols["n"][i]),
                n_nonfinite=int(cols["n_nonfinite"][i]))
        return cls(tensors, header["model_sha256"], header["n_samples"], header["sample_digest"], header["meta"])

    def check_model(self, model) -> None:
        """Raise ``RangesError`` if these statistics were not collected on ``model``."""
        if self.model_sha256 and model.sha256 and self.model_sha256 != model.sha256:
            known = set(model.producers) | {s.name for s in model.inputs}
            foreign = [t for t in self.tensors if t not in known]
            detail = f"; tensors not in the model: {foreign[:3]}" if foreign else ""
            raise RangesError(
                f"statistics were collected on another model (sha256 {self.model_sha256[:12]}…, this model "
                f"{model.sha256[:12]}…){detail}", hint="collect statistics for this model with 'calib collect'")
