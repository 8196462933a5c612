"""Features for sampling without a model: a cheap image descriptor or block means of the arrays.

The model's own features (pooled late activations, run on ONNX Runtime) are
``calib.subset.model_features``; both are standardised here (``standardise``): each
tensor's block of columns is z-scored and scaled by ``1/sqrt(columns)`` so that every
block weighs the same in distances.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np

from calib.data.preprocess import to_rgb
from calib.errors import InputDataError

__all__ = ["descriptor_features", "image_descriptor", "standardise"]

log = logging.getLogger(__name__)
Progress = Callable[[str, int, "int | None"], None]


def standardise(blocks: Sequence[np.ndarray]) -> np.ndarray:
    """Column z-scores, each block divided by sqrt(its width); constant columns become 0."""
    out = []
    for b in blocks:
        b = np.asarray(b, dtype=np.float64)
        sd = b.std(0)
        z = (b - b.mean(0)) / np.where(sd > 0, sd, 1.0)
        out.append(z / np.sqrt(b.shape[1]))
    return np.concatenate(out, axis=1)


def image_descriptor(img) -> np.ndarray:
    """16x16 grey thumbnail (values 0-1) + an 8-bin histogram per RGB channel (fractions)."""
    rgb = to_rgb(img)
    thumb = np.asarray(rgb.convert("L").resize((16, 16), 4), dtype=np.float64).ravel() / 255.0  # 4 = BOX
    a = np.asarray(rgb.resize((64, 64), 4), dtype=np.int64)
    hist = [np.bincount(a[..., c].ravel() // 32, minlength=8) / a[..., c].size for c in range(3)]
    return np.concatenate([thumb, *hist])


def _array_descriptor(feeds: dict[str, np.ndarray], dims: int = 256) -> np.ndarray:
    parts = []
    for k in sorted(feeds):
        v = np.asarray(feeds[k], dtype=np.float64).ravel()
        chunks = np.array_split(v, min(dims, v.size))
        parts.append(np.array([c.mean() for c in chunks]))
    return np.concatenate(parts)


def descriptor_features(source, *, progress: Progress | None = None) -> np.ndarray:
    """Cheap features without a model: image descriptors, or block means of the arrays."""
    rows = []
    total = len(source)
    if hasattr(source, "image"):
        for i in range(total):
            img = source.image(i)
            if img is None:
                raise InputDataError(f"{source.items[i][1]}: unreadable; features need every sample",
                                     hint="remove the bad files from the pool")
            rows.append(image_descriptor(img))
            if progress:
                progress("features", i + 1, total)
    else:
        for i, s in enumerate(source):
            rows.append(_array_descriptor(s.feeds))
            if progress:
                progress("features", i + 1, total)
    X = np.stack(rows)
    return standardise([X])
