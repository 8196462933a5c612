"""Slow, obvious reference implementations of calib's comparison metrics (plain numpy, float64, loops).

Written from the definitions in calib.compare.metrics' docstring, not from its code.
"""

from __future__ import annotations

import math

import numpy as np


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    na, nb = math.sqrt(float(np.sum(a * a))), math.sqrt(float(np.sum(b * b)))
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return max(-1.0, min(1.0, float(np.sum(a * b)) / (na * nb)))


def layer_metrics(fp32_batches: list[np.ndarray], int8_batches: list[np.ndarray]) -> dict[str, float]:
    """Metrics of one tensor over a list of batches (axis 0 = sample)."""
    per_sample = []
    for a, b in zip(fp32_batches, int8_batches):
        for i in range(a.shape[0]):
            per_sample.append(cosine(a[i], b[i]))
    a = np.concatenate([x.astype(np.float64).ravel() for x in fp32_batches])
    b = np.concatenate([x.astype(np.float64).ravel() for x in int8_batches])
    e = b - a
    signal, noise = float(np.sum(a * a)), float(np.sum(e * e))
    return {
        "cosine": float(np.mean(per_sample)),
        "min_cosine": float(np.min(per_sample)),
        "cosine_global": cosine(a, b),
        "sqnr_db": math.inf if noise == 0 else 10 * math.log10(signal / noise),
        "max_abs_error": float(np.max(np.abs(e))),
        "mean_abs_error": float(np.mean(np.abs(e))),
        "relative_error": math.sqrt(noise / signal),
    }


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    same = 0
    for i in range(a.shape[0]):
        same += int(np.argmax(a[i]) == np.argmax(b[i]))
    return same / a.shape[0]
