"""Choose a calibration subset of a pool, with features drawn from the model when one is given.

``model_features`` exposes a few late float activations (the deepest 4-D tensors,
or 3-D/2-D ones for sequence models) on a copy of the model, runs ONNX Runtime
(``calib.runtime``) batch by batch and keeps only their global average over the
spatial/sequence axes, so memory is ``n_samples x channels``. ``sample_source`` draws
the subset with a strategy of ``calib.data.sampling`` on those features (or, without a
model, on ``calib.data.features.descriptor_features``).
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np

from calib.data.base import batches
from calib.data.features import descriptor_features, standardise
from calib.data.sampling import Subset, check_pool_size, pool_ids, pool_labels, radius, reduce_features, select
from calib.errors import InputDataError
from calib.runtime import expose_outputs, make_session

__all__ = ["pick_feature_tensors", "model_features", "sample_source"]

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


def model_features(model, source, *, tensors: Sequence[str] | None = None, batch_size: int = 16,
                   providers: Sequence[str] | None = None, progress: Progress | None = None
                   ) -> tuple[np.ndarray, list[str]]:
    """(features [n_samples, d], tensor names) from one ORT pass over ``source``."""
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


def sample_source(source, n: int, strategy: str, *, model=None, seed: int = 0, features: np.ndarray | None = None,
                  data: str = "", batch_size: int = 16, progress: Progress | None = None) -> Subset:
    """Choose ``n`` samples of ``source``; features (for kmeans/kcenter) come from ``model`` if given."""
    ids = pool_ids(source)
    labels = pool_labels(source)
    check_pool_size(n, len(ids))
    how = ""
    if strategy in ("kmeans", "kcenter") and features is None:
        if model is not None:
            features, tensors = model_features(model, source, batch_size=batch_size, progress=progress)
            how = "model: global-average-pooled " + ", ".join(tensors)
        else:
            features = descriptor_features(source, progress=progress)
            how = "image descriptor (16x16 grey thumbnail + colour histogram)"
    if features is not None:
        features = reduce_features(features, seed=seed)
    idx = select(n, strategy, seed=seed, pool_size=len(ids), labels=labels, features=features)
    rad = radius(features, idx) if features is not None else None
    counts: dict[str, int] = {}
    if labels is not None:
        for i in idx:
            counts[str(labels[i])] = counts.get(str(labels[i]), 0) + 1
    return Subset([int(i) for i in idx], [ids[i] for i in idx], strategy, seed, len(ids), data, how, rad,
                  dict(sorted(counts.items(), key=lambda kv: int(kv[0]))))
