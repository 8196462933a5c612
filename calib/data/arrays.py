"""``.npz`` / ``.npy`` sources: arrays keyed by model input name, first axis = sample.

An optional ``labels`` array (integers, one per sample) rides along. ``.npy``
holds a single array for a single-input model. Object arrays are refused
(``allow_pickle=False``). Arrays are memory-mapped where numpy allows it, so a
large file is read lazily, one sample at a time.

Layout: an array whose rank equals the model input's rank is a *batch* of
samples (first axis = sample); an array of rank + 1 is a *stack of complete
feeds*, one per entry along axis 0 (models without a batch axis).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from calib.data.base import Sample
from calib.errors import InputDataError
from calib.io import npy_header, read_npz
from calib.model import InputSpec

__all__ = ["NpzSource", "LABELS_KEY", "MAX_LABELS_BYTES"]

LABELS_KEY = "labels"
MAX_LABELS_BYTES = 1 << 26  # 64 MiB: 8 million int64 labels; a bigger 'labels' member is refused, not read


class NpzSource:
    """Samples from an ``.npz`` (or ``.npy``) file, read lazily."""

    def __init__(self, path: str | Path, inputs: Sequence[InputSpec] | None = None, *,
                 indices: Sequence[int] | None = None) -> None:
        self.path = Path(path)
        self.inputs = inputs
        self.arrays, self.labels = _open(self.path, inputs)
        n = {k: len(v) for k, v in self.arrays.items()}
        if len(set(n.values())) > 1:
            raise InputDataError(f"{self.path}: arrays have different numbers of samples {n}",
                                 hint="the first axis of every array is the sample axis")
        self.n_total = next(iter(n.values()))
        if self.labels is not None and len(self.labels) != self.n_total:
            raise InputDataError(f"{self.path}: 'labels' has {len(self.labels)} entries for {self.n_total} samples")
        if self.n_total == 0:
            raise InputDataError(f"{self.path}: holds no samples (first axis has length 0)",
                                 hint="calibration needs at least one sample")
        self.layout = _layout(self.path, self.arrays, inputs)
        self.indices = list(range(self.n_total)) if indices is None else [int(i) for i in indices]
        bad = [i for i in self.indices if not 0 <= i < self.n_total]
        if bad:
            raise InputDataError(f"{self.path}: sample index {bad[0]} out of range (file has {self.n_total})")

    def __reduce__(self):
        """Pickled by reference (path, inputs, indices): a Ray worker re-opens the file, never gets the samples."""
        return _reopen, (self.path, self.inputs, self.indices)

    def subset(self, indices: Sequence[int]) -> "NpzSource":
        sub = object.__new__(NpzSource)
        sub.__dict__.update(self.__dict__)
        sub.indices = [self.indices[i] for i in indices]
        return sub

    def __len__(self) -> int:
        return len(self.indices)

    def ids(self) -> list[str]:
        return [self.sample_id(i) for i in self.indices]

    def labels_list(self) -> list[int | None]:
        return [None if self.labels is None else int(self.labels[i]) for i in self.indices]

    def sample_id(self, i: int) -> str:
        return f"{self.path.name}[{i}]"

    def __iter__(self) -> Iterator[Sample]:
        for i in self.indices:
            label = None if self.labels is None else int(self.labels[i])
            yield Sample(self.sample_id(i), {k: np.asarray(v[i]) for k, v in self.arrays.items()}, label)

    def __repr__(self) -> str:
        return f"NpzSource({str(self.path)!r}, {len(self)} samples, layout={self.layout})"


def _reopen(path: Path, inputs, indices: list[int]) -> NpzSource:
    return NpzSource(path, inputs, indices=indices)


class _NpzMember:
    """One C-ordered array inside an ``.npz``, read sample by sample from the zip stream.

    Iterating in increasing index order streams; going backwards reopens the member.
    """

    def __init__(self, zf: zipfile.ZipFile, member: str, path: Path, key: str) -> None:
        self._zf, self._member, self._path, self._key = zf, member, path, key
        with zf.open(member) as f:  # the header is checked against the member's size before any data is read
            h = npy_header(f, f"{path}: array '{key}'", size=zf.getinfo(member).file_size)
        if not h.shape:
            raise InputDataError(f"{path}: array '{key}' is a scalar; the first axis must be the sample axis")
        self.shape, self.dtype, self.fortran = h.shape, h.dtype, h.fortran
        self.ndim = len(self.shape)
        self._item = int(np.prod(self.shape[1:], dtype=np.int64)) * h.dtype.itemsize
        self._f = None
        self._next = 0

    def __len__(self) -> int:
        return self.shape[0]

    def _rewind(self) -> None:
        if self._f is not None:
            self._f.close()
        self._f = self._zf.open(self._member)
        version = np.lib.format.read_magic(self._f)
        (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(self._f)
        self._next = 0

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if self._f is None or i < self._next:
            self._rewind()
        while self._next < i:  # skip forward
            skip = min(i - self._next, max(1, (1 << 24) // max(self._item, 1)))
            self._read_exact(skip * self._item)
            self._next += skip
        buf = self._read_exact(self._item)
        self._next += 1
        return np.frombuffer(buf, dtype=self.dtype).reshape(self.shape[1:]).copy()

    def read_all(self) -> np.ndarray:
        """The whole (small, checked) array in one read."""
        self._rewind()
        buf = self._read_exact(len(self) * self._item)
        self._next = len(self)
        return np.frombuffer(buf, dtype=self.dtype).reshape(self.shape).copy()

    def _read_exact(self, n: int) -> bytes:
        data = self._f.read(n)
        if len(data) != n:
            raise InputDataError(f"{self._path}: array '{self._key}' is truncated (sample {self._next})")
        return data


def _open(path: Path, inputs: Sequence[InputSpec] | None) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    if not path.exists():
        raise InputDataError(f"{path}: no such file", hint="check the data path")
    try:
        obj = _open_npy(path) if path.suffix == ".npy" else _open_npz(path)
    except InputDataError:
        raise
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise InputDataError(f"{path}: holds object arrays, which calib refuses to unpickle",
                                 hint="save plain numeric arrays (np.savez with numeric dtypes)") from None
        raise InputDataError(f"{path}: not a readable .npy/.npz file ({e})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise InputDataError(f"{path}: not a readable .npy/.npz file ({e})") from None
    if isinstance(obj, np.ndarray):
        if inputs is None or len(inputs) != 1:
            raise InputDataError(f"{path}: a .npy file holds one array, usable only for a single-input model",
                                 hint="use .npz with arrays keyed by input name")
        return {inputs[0].name: obj}, None
    arrays: dict[str, np.ndarray] = {}
    labels = None
    for k, a in obj.items():
        if a.dtype.kind not in "biuf":
            raise InputDataError(f"{path}: array '{k}' has dtype {a.dtype}; only numeric arrays are accepted")
        if k == LABELS_KEY:
            labels = _read_labels(path, a)
        else:
            arrays[k] = a
    if not arrays:
        raise InputDataError(f"{path}: holds no input arrays")
    if inputs is not None:
        names = {s.name for s in inputs}
        unknown = [k for k in arrays if k not in names]
        if unknown:
            raise InputDataError(
                f"{path}: array '{unknown[0]}' is not a model input (model inputs: {sorted(names)})",
                hint="key each array by the model input's name; extra arrays other than 'labels' are refused")
        missing = [n for n in names if n not in arrays]
        if missing:
            raise InputDataError(f"{path}: no array for model input '{missing[0]}' (file has {sorted(arrays)})")
    if labels is not None and labels.dtype.kind not in "iub":
        raise InputDataError(f"{path}: 'labels' must be integers, got {labels.dtype}")
    return arrays, labels


def _open_npy(path: Path) -> np.ndarray:
    with open(path, "rb") as f:  # the declared shape x itemsize must fit the file before numpy maps it
        npy_header(f, str(path), size=path.stat().st_size)
    return np.load(path, allow_pickle=False, mmap_mode="r")


def _read_labels(path: Path, a) -> np.ndarray:
    """The whole 'labels' member in one read, its size checked from the header first."""
    if not (a.ndim == 1 or (a.ndim == 2 and a.shape[1] == 1)):  # (N,) or a column (N, 1)
        raise InputDataError(f"{path}: 'labels' has shape {tuple(a.shape)}; expected one integer per sample")
    if len(a) * a.dtype.itemsize > MAX_LABELS_BYTES:
        raise InputDataError(f"{path}: 'labels' declares {len(a)} entries, more than calib reads "
                             f"({MAX_LABELS_BYTES // a.dtype.itemsize})")
    return (a.read_all() if isinstance(a, _NpzMember) else np.asarray(a)).reshape(-1)


def _open_npz(path: Path) -> dict[str, "_NpzMember | np.ndarray"]:
    zf = zipfile.ZipFile(path)
    out: dict[str, _NpzMember | np.ndarray] = {}
    for member in zf.namelist():
        key = member[:-4] if member.endswith(".npy") else member
        m = _NpzMember(zf, member, path, key)
        # Fortran-ordered members cannot be streamed by sample: read them whole (rare; np.savez writes C order)
        out[key] = read_npz(path)[key] if m.fortran else m
    return out


def _layout(path: Path, arrays: dict[str, np.ndarray], inputs: Sequence[InputSpec] | None) -> str:
    if inputs is None:
        return "batch"
    kinds = set()
    for s in inputs:
        r = arrays[s.name].ndim
        if r == len(s.shape):
            kinds.add("batch")
        elif r == len(s.shape) + 1:
            kinds.add("feed")
        else:
            raise InputDataError(
                f"{path}: array '{s.name}' has rank {r} (shape {arrays[s.name].shape}); model input "
                f"'{s.name}' {s.describe()} needs rank {len(s.shape)} (a batch) or {len(s.shape) + 1} "
                "(a stack of complete feeds)")
    if len(kinds) > 1:
        raise InputDataError(f"{path}: some arrays are batches and some are stacks of feeds; use one layout")
    return kinds.pop()
