"""Data for ``fmnist_cnn``: the public check case kept in bench/models/fmnist_cnn/ (copied from the project's
shared cases; see its README.md): a small residual CNN trained on Fashion-MNIST (Debian's
``dataset-fashion-mnist``, MIT), with ``calib.npz`` (500 preprocessed train images the model never saw) and
``eval.npz`` (the first 2,000 test images with labels). The calibration pool is calib.npz in its order (so
calib_100.npz is its first 100 images). The evaluation set is eval.npz followed by the rest of the official
test set (images 2,000-9,999 from Debian's package, preprocessed the same way: ``resnet_fmnist.load_split``,
which reproduces eval.npz exactly, checked here): 10,000 images, so a difference of a few images between two
INT8 models is not read as a difference between tools (2,000 images: one image is 0.05 points).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resnet_fmnist import load_split  # noqa: E402

CASE = Path(__file__).resolve().parent / "fmnist_cnn"


def build_pool(total: int, n_eval: int) -> tuple[dict, None, dict, np.ndarray]:
    with np.load(CASE / "calib.npz", allow_pickle=False) as c, np.load(CASE / "eval.npz", allow_pickle=False) as e:
        calib, images, labels = c["input"], e["input"], e["labels"]
    if n_eval > len(images):
        test, test_labels = load_split("test")
        if not (np.array_equal(test[: len(images)], images) and np.array_equal(test_labels[: len(images)], labels)):
            raise SystemExit("fmnist_cnn: the test set's first images differ from the case's eval.npz")
        images, labels = test, test_labels
    if total > len(calib) or n_eval > len(images):
        raise SystemExit(f"fmnist_cnn: the case has {len(calib)} calibration and {len(images)} evaluation images; "
                         f"asked for {total} and {n_eval}")
    return {"input": calib[:total]}, None, {"input": images[:n_eval]}, labels[:n_eval].astype(np.int64)
