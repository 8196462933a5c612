"""Data for ``fmnist_cnn``: the public check case kept in bench/models/fmnist_cnn/ (copied from the project's
shared cases; see its README.md): a small residual CNN trained on Fashion-MNIST (Debian's
``dataset-fashion-mnist``, MIT), with ``calib.npz`` (500 preprocessed train images the model never saw) and
``eval.npz`` (the first 2,000 test images with labels). The calibration pool is calib.npz in its order (so
calib_100.npz is its first 100 images), the evaluation set is eval.npz, whole.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CASE = Path(__file__).resolve().parent / "fmnist_cnn"


def build_pool(total: int, n_eval: int) -> tuple[dict, None, dict, np.ndarray]:
    with np.load(CASE / "calib.npz", allow_pickle=False) as c, np.load(CASE / "eval.npz", allow_pickle=False) as e:
        calib, images, labels = c["input"], e["input"], e["labels"]
    if total > len(calib) or n_eval > len(images):
        raise SystemExit(f"fmnist_cnn: the case has {len(calib)} calibration and {len(images)} evaluation images; "
                         f"asked for {total} and {n_eval}")
    return {"input": calib[:total]}, None, {"input": images[:n_eval]}, labels[:n_eval].astype(np.int64)
