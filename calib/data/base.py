"""Samples and sources: what every stage that runs a model reads.

A ``Sample`` is one calibration or evaluation input with a stable ``id`` (a path
or ``file.npz[17]``) that errors, reports and the dashboard use. ``feeds`` maps
model input names to arrays. For a ``layout == "batch"`` source the arrays have no
batch axis and are stacked into batches; for ``layout == "feed"`` each sample is
one complete feed (models without a batch axis, e.g. stateful sequence exports).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

from calib.errors import InputDataError
from calib.model import InputSpec

__all__ = ["Sample", "Source", "ListSource", "batches", "check_feeds", "limited"]


@dataclass(frozen=True)
class Sample:
    id: str
    feeds: dict[str, np.ndarray]
    label: int | None = None


@runtime_checkable
class Source(Protocol):
    """An iterable of samples with a known length; iterating twice gives the same samples."""

    layout: str  # "batch" or "feed"

    def __iter__(self) -> Iterator[Sample]: ...

    def __len__(self) -> int: ...


class ListSource:
    """Samples held in memory (tests, small sets, subsets of another source)."""

    def __init__(self, samples: Sequence[Sample], layout: str = "batch", name: str = "samples") -> None:
        self.samples = list(samples)
        self.layout = layout
        self.name = name

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"ListSource({self.name!r}, {len(self)} samples)"


_FLOAT_KINDS = "f"
_INT_KINDS = "iub"


def check_feeds(sample: Sample, inputs: Sequence[InputSpec], *, layout: str = "batch") -> None:
    """Check one sample against the model's inputs; raise ``InputDataError`` naming input and sample."""
    names = {s.name for s in inputs}
    missing = [n for n in names if n not in sample.feeds]
    if missing:
        raise InputDataError(
            f"sample {sample.id}: no data for model input '{missing[0]}' (data has {sorted(sample.feeds)}, "
            f"model expects {sorted(names)})",
            hint="key the arrays by the model's input names",
        )
    extra = [k for k in sample.feeds if k not in names]
    if extra:
        raise InputDataError(
            f"sample {sample.id}: data has '{extra[0]}', which is not a model input (model expects {sorted(names)})"
        )
    for spec in inputs:
        x = sample.feeds[spec.name]
        want = spec.shape[1:] if layout == "batch" else spec.shape
        got = x.shape
        if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
            shown_w = "(" + ", ".join("N" if d is None else str(d) for d in spec.shape) + ")"
            shown_g = str(("N",) + tuple(got)) if layout == "batch" else str(tuple(got))
            raise InputDataError(
                f"sample {sample.id}: input '{spec.name}' has shape {shown_g.replace(chr(39), '')}, "
                f"expected {shown_w}",
                hint="check preprocessing (resize/crop/layout) or the data's first axis",
            )
        if x.dtype.kind != spec.dtype.kind and not (x.dtype.kind in _INT_KINDS and spec.dtype.kind in _INT_KINDS):
            raise InputDataError(
                f"sample {sample.id}: input '{spec.name}' has dtype {x.dtype}, expected {spec.dtype}",
                hint="convert the data to the model's input dtype",
            )
        if x.dtype.kind in _FLOAT_KINDS and not np.isfinite(x).all():
            bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
            raise InputDataError(
                f"sample {sample.id}: input '{spec.name}' holds {bad} NaN/inf value(s)",
                hint="fix or drop this sample; calibration data must be finite",
            )


def limited(source: Iterable[Sample], limit: int | None) -> Iterator[Sample]:
    """The first ``limit`` samples of ``source`` (all of them when ``limit`` is None)."""
    for i, s in enumerate(source):
        if limit is not None and i >= limit:
            return
        yield s


def batches(samples: Iterable[Sample], inputs: Sequence[InputSpec], batch_size: int, *,
            layout: str = "batch") -> Iterator[tuple[list[str], dict[str, np.ndarray], list[int | None]]]:
    """Group samples into ``(ids, feeds, labels)`` batches, checking and casting each sample.

    With ``layout == "feed"`` every sample is its own batch (a complete feed). A model whose
    batch axis is fixed gets batches of exactly that size.
    """
    if batch_size < 1:
        raise InputDataError(f"batch size must be >= 1, got {batch_size}")
    fixed = {s.shape[0] for s in inputs if s.shape and s.shape[0] is not None}
    if layout == "batch" and len(fixed) == 1:
        # the model's batch axis is fixed (e.g. [1, 3, 800, 608]): batches must have exactly that size
        batch_size = fixed.pop()
    dtypes = {s.name: s.dtype for s in inputs}
    ids: list[str] = []
    labels: list[int | None] = []
    buf: dict[str, list[np.ndarray]] = {s.name: [] for s in inputs}
    step = 1 if layout == "feed" else batch_size
    for s in samples:
        check_feeds(s, inputs, layout=layout)
        ids.append(s.id)
        labels.append(s.label)
        for k in buf:
            buf[k].append(np.asarray(s.feeds[k], dtype=dtypes[k]))
        if len(ids) == step:
            yield ids, _stack(buf, layout, ids), labels
            ids, labels = [], []
            buf = {k: [] for k in buf}
    if ids:
        yield ids, _stack(buf, layout, ids), labels


def _stack(buf: dict[str, list[np.ndarray]], layout: str, ids: list[str]) -> dict[str, np.ndarray]:
    if layout == "feed":
        return {k: v[0] for k, v in buf.items()}
    out = {}
    for k, v in buf.items():
        shapes = [a.shape for a in v]
        if len(set(shapes)) > 1:
            j = next(i for i, sh in enumerate(shapes) if sh != shapes[0])
            raise InputDataError(
                f"sample {ids[j]}: input '{k}' has shape {shapes[j]}, but sample {ids[0]} in the same batch has "
                f"{shapes[0]}", hint="resize the inputs to one shape, or use --batch-size 1")
        out[k] = np.stack(v)
    return out
