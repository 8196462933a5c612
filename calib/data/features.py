"""Features for sampling: the model's pooled late activations, or a cheap image descriptor.

``model_features`` exposes a few late float activations (the deepest 4-D tensors,
or 3-D/2-D ones for sequence models) on a copy of the model, runs ONNX Runtime
batch by batch and keeps only their global average over the spatial/sequence axes,
so memory is ``n_samples x channels``. Each tensor's block of columns is standardised
and scaled by ``1/sqrt(columns)`` so that every tensor weighs the same in distances.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np

from calib.data.base import batches
from calib.errors import InputDataError

__all__ = ["pick_feature_tensors", "model_features", "descriptor_features", "image_descriptor", "standardise"]

log = logging.getLogger(__name__)
Progress = Callable[[str, int, "int | None"], None]


def pick_feature_tensors(model, k: int = 3) -> list[str]:
    """Up to ``k`` late float activations: the deepest feature maps of distinct shapes, plus the deepest pooled one.

    Feature maps are 4-D tensors with a spatial size above 1 (3-D for sequence models); the pooled
    one is the deepest tensor whose spatial size is 1 or that is 2-D (the classifier's embedding).
    """
    shapes, depth, outputs = model.tensor_shapes, model.tensor_depth, set(model.output_names)
    cands = sorted((t for t in depth if t not in outputs and model.is_float(t) and t in shapes
                    and 2 <= len(shapes[t]) <= 4 and shapes[t][1] not in (None, 1)),
                   key=lambda t: (-depth[t], t))
    if not cands:
        raise InputDataError("the model has no float activation with a known shape to draw features from",
                             hint="sample without --model (image descriptor) or use --strategy random")

    def spatial(t: str) -> int | None:
        dims = shapes[t][2:]
        return None if any(d is None for d in dims) else int(np.prod(dims)) if dims else 1

    maps = [t for t in cands if len(shapes[t]) >= 3 and spatial(t) != 1]
    pooled = [t for t in cands if spatial(t) == 1]
    chosen: list[str] = pooled[:1]
    seen_shapes: set = set()
    for t in maps:
        if len(chosen) >= k:
            break
        if shapes[t] not in seen_shapes:
            seen_shapes.add(shapes[t])
            chosen.append(t)
    for t in cands:  # fill up if the model has few distinct shapes
        if len(chosen) >= k:
            break
        if t not in chosen:
            chosen.append(t)
    return sorted(chosen, key=lambda t: depth[t])


def _pool(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 4:
        return x.mean(axis=(2, 3))
    if x.ndim == 3:
        return x.mean(axis=1)
    return x.reshape(len(x), -1)


def standardise(blocks: Sequence[np.ndarray]) -> np.ndarray:
    """Column z-scores, each block divided by sqrt(its width); constant columns become 0."""
    out = []
    for b in blocks:
        b = np.asarray(b, dtype=np.float64)
        sd = b.std(0)
        z = (b - b.mean(0)) / np.where(sd > 0, sd, 1.0)
        out.append(z / np.sqrt(b.shape[1]))
    return np.concatenate(out, axis=1)


def model_features(model, source, *, tensors: Sequence[str] | None = None, batch_size: int = 16,
                   providers: Sequence[str] | None = None, progress: Progress | None = None
                   ) -> tuple[np.ndarray, list[str]]:
    """(features [n_samples, d], tensor names) from one ORT pass over ``source``."""
    from calib.collect import expose_outputs, make_session

    names = list(tensors) if tensors is not None else pick_feature_tensors(model)
    sess = make_session(expose_outputs(model.proto, names), providers)
    layout = getattr(source, "layout", "batch")
    total = len(source)
    blocks: dict[str, list[np.ndarray]] = {t: [] for t in names}
    done = 0
    for ids, feeds, _ in batches(source, model.inputs, batch_size, layout=layout):
        outs = sess.run(names, feeds)
        for t, v in zip(names, outs):
            blocks[t].append(_pool(v if layout == "batch" else v[None]))
        done += len(ids)
        if progress:
            progress("features", done, total)
    if done == 0:
        raise InputDataError("no samples to compute features from")
    if done != total:
        raise InputDataError(f"{total - done} of {total} samples could not be read; features need every sample",
                             hint="remove the bad files from the pool (see the skipped list)")
    return standardise([np.concatenate(blocks[t]) for t in names]), names


def image_descriptor(img) -> np.ndarray:
    """16x16 grey thumbnail (values 0-1) + an 8-bin histogram per RGB channel (fractions)."""
    from calib.data.preprocess import to_rgb

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
