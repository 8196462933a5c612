"""Split samples by id so that what chooses never reports on itself.

``split_source(source, select_fraction=0.25)`` puts every sample in one of two
parts by a hash of its id (SHA-256 of the UTF-8 id, first 8 bytes as an integer,
divided by 2**64): ids whose hash falls below ``select_fraction`` form the
*selection* part, the rest the *report* part. The split depends on the id alone,
so it does not change with the order of the samples, the batch size or the other
samples present, and a sample never moves between parts when more data is added.

Statistics are collected on all samples; ``auto``, ``best``, ``advise`` and bias
correction choose on the selection part; figures are measured on evaluation data
when given, else on the report part (labelled "in-sample" when nothing else
exists). Both parts are ``ListSource``-like subsets that iterate the parent source.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Iterator

from calib.data.base import Sample, Source
from calib.errors import ConfigError, InputDataError

__all__ = ["DEFAULT_SELECT_FRACTION", "Split", "hash_fraction", "split_ids", "split_source", "SubsetSource"]

DEFAULT_SELECT_FRACTION = 0.25


def hash_fraction(sample_id: str) -> float:
    """A number in [0, 1) fixed by ``sample_id`` alone."""
    digest = hashlib.sha256(sample_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def _check_fraction(select_fraction: float) -> None:
    if not 0.0 < select_fraction < 1.0:
        raise ConfigError(f"select fraction must be in (0, 1), got {select_fraction}",
                          hint="e.g. --select-fraction 0.25 holds out about a quarter of the samples")


def split_ids(ids: Iterable[str], select_fraction: float = DEFAULT_SELECT_FRACTION) -> tuple[list[str], list[str]]:
    """``(selection ids, report ids)`` in input order; each id lands in exactly one part."""
    _check_fraction(select_fraction)
    sel, rep = [], []
    for i in ids:
        (sel if hash_fraction(i) < select_fraction else rep).append(i)
    return sel, rep


class SubsetSource:
    """The samples of ``parent`` whose ids are in ``ids``, in the parent's order (iterates the parent)."""

    def __init__(self, parent: Source, ids: Iterable[str], name: str) -> None:
        self.parent = parent
        self.ids = list(ids)
        self._set = frozenset(self.ids)
        self.layout = parent.layout
        self.name = name

    def __iter__(self) -> Iterator[Sample]:
        return (s for s in self.parent if s.id in self._set)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"SubsetSource({self.name!r}, {len(self)} of {len(self.parent)} samples)"


@dataclass
class Split:
    """The two parts of one source: ``select`` (to choose on) and ``report`` (to measure on)."""

    select: SubsetSource
    report: SubsetSource
    select_fraction: float

    def to_json(self) -> dict:
        return {"select_fraction": self.select_fraction, "n_select": len(self.select),
                "n_report": len(self.report), "rule": "sha256(sample id)[:8] / 2**64 < select_fraction"}


def split_source(source: Source, select_fraction: float = DEFAULT_SELECT_FRACTION, *, min_each: int = 1) -> Split:
    """Split ``source`` by sample id (see the module docstring); both parts hold ``min_each`` samples or more.

    Ids must be unique (a repeated id would put one sample in both parts' bookkeeping).
    With very few samples the hash may leave a part empty: then the sample(s) with
    the lowest hash form the selection part, so a split of n >= 2 samples always works.
    """
    _check_fraction(select_fraction)
    ids = [s.id for s in source]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputDataError(f"sample {dup}: the id occurs more than once; cannot split the data by sample id",
                             hint="give every sample a distinct id")
    if len(ids) < 2 * min_each:
        raise InputDataError(f"{len(ids)} sample(s): too few to hold out a selection part "
                             f"(need at least {2 * min_each})", hint="add samples or pass evaluation data")
    sel, rep = split_ids(ids, select_fraction)
    if len(sel) < min_each or len(rep) < min_each:
        ranked = sorted(ids, key=hash_fraction)
        k = min(max(round(select_fraction * len(ids)), min_each), len(ids) - min_each)
        chosen = set(ranked[:k])
        sel = [i for i in ids if i in chosen]
        rep = [i for i in ids if i not in chosen]
    return Split(SubsetSource(source, sel, "selection"), SubsetSource(source, rep, "report"), select_fraction)
