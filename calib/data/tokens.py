"""Token inputs: int64 id sequences, ragged ones padded to a fixed length with a matching mask.

A token file is JSONL, one sample per line: arrays keyed by model input name
(``{"input_ids": [101, 2023, 102], "label": 1}``). Sequences shorter than the
length are padded on the right with ``pad_id``; the model's attention-mask input
(a name containing ``mask``), when the row does not give it, is 1 over the real
tokens and 0 over the padding. The length is the model input's fixed sequence
dim, else ``length``, else the longest sequence in the file. Longer sequences are
refused unless ``truncate=True``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from calib.data.base import Sample
from calib.errors import InputDataError
from calib.model import InputSpec

__all__ = ["pad_sequences", "TokenSource"]


def pad_sequences(seqs: Sequence[Sequence[int]], length: int | None = None, *, pad_id: int = 0,
                  truncate: bool = False, name: str = "sequence") -> tuple[np.ndarray, np.ndarray]:
    """Right-pad ragged int sequences: ``(ids, mask)``, both int64 of shape (len(seqs), length)."""
    lens = [len(s) for s in seqs]
    length = max(lens, default=0) if length is None else int(length)
    if length < 1:
        raise InputDataError(f"{name}: cannot pad to length {length}")
    ids = np.full((len(seqs), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), length), dtype=np.int64)
    for i, s in enumerate(seqs):
        if len(s) > length and not truncate:
            raise InputDataError(f"{name} {i}: {len(s)} tokens, longer than the fixed length {length}",
                                 hint="raise the length or allow truncation")
        a = np.asarray(s[:length], dtype=np.int64)
        ids[i, :len(a)] = a
        mask[i, :len(a)] = 1
    return ids, mask


class TokenSource:
    """Samples from a JSONL token file, padded per sample to one fixed length (see module doc)."""

    layout = "batch"

    def __init__(self, path: str | Path, inputs: Sequence[InputSpec], *, length: int | None = None,
                 pad_id: int = 0, truncate: bool = False) -> None:
        self.path = Path(path)
        self.inputs = list(inputs)
        self.pad_id, self.truncate = pad_id, truncate
        self.rows: list[dict[str, list[int]]] = []
        labels: list[int | None] = []
        names = {s.name for s in self.inputs}
        masks = [s.name for s in self.inputs if "mask" in s.name.lower()]
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputDataError(f"{self.path} line {n}: not valid JSON ({e.msg})") from None
            label = obj.pop("label", None)
            unknown = [k for k in obj if k not in names]
            if unknown:
                raise InputDataError(f"{self.path} line {n}: '{unknown[0]}' is not a model input "
                                     f"(inputs: {sorted(names)})")
            missing = [k for k in names if k not in obj and k not in masks]
            if missing:
                raise InputDataError(f"{self.path} line {n}: no '{missing[0]}' (model inputs: {sorted(names)})")
            for k, v in obj.items():
                if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
                    raise InputDataError(f"{self.path} line {n}: '{k}' must be a list of integers")
            self.rows.append(obj)
            labels.append(None if label is None else int(label))
        if not self.rows:
            raise InputDataError(f"{self.path}: holds no samples")
        if any(lab is not None for lab in labels) and any(lab is None for lab in labels):
            raise InputDataError(f"{self.path}: sample {labels.index(None)} has no label while others do")
        self.labels = labels if labels[0] is not None else None
        fixed = {s.shape[1] for s in self.inputs if len(s.shape) == 2 and s.shape[1] is not None}
        if len(fixed) > 1:
            raise InputDataError(f"model inputs have different fixed sequence lengths {sorted(fixed)}")
        longest = max(len(v) for r in self.rows for v in r.values())
        self.length = fixed.pop() if fixed else (length or longest)
        self.masks = [m for m in masks if all(m not in r for r in self.rows)]

    def __len__(self) -> int:
        return len(self.rows)

    def ids(self) -> list[str]:
        return [f"{self.path.name}[{i}]" for i in range(len(self.rows))]

    def subset(self, indices: Sequence[int]) -> "TokenSource":
        sub = object.__new__(TokenSource)
        sub.__dict__.update(self.__dict__)
        sub.rows = [self.rows[int(i)] for i in indices]
        sub.labels = None if self.labels is None else [self.labels[int(i)] for i in indices]
        return sub

    def __iter__(self) -> Iterator[Sample]:
        dtypes = {s.name: s.dtype for s in self.inputs}
        for i, row in enumerate(self.rows):
            sid = f"{self.path.name}[{i}]"
            feeds, real = {}, None
            for k, v in row.items():
                ids, mask = pad_sequences([v], self.length, pad_id=self.pad_id if "mask" not in k.lower() else 0,
                                          truncate=self.truncate, name=f"{sid} '{k}'")
                feeds[k] = ids[0].astype(dtypes[k])
                real = mask[0] if real is None else real
            for m in self.masks:
                feeds[m] = real.astype(dtypes[m])
            yield Sample(sid, feeds, None if self.labels is None else self.labels[i])
