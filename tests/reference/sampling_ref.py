"""Slow, obvious references for calib.data.sampling (plain loops over rows)."""

from __future__ import annotations

import math


def dist(a, b) -> float:
    return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))


def nearest_unchosen_per_centre(X, centres) -> list[int]:
    """For each centre in order, the index of the nearest row of X not chosen before (ties: lowest index)."""
    chosen: list[int] = []
    for c in centres:
        best, best_d = None, math.inf
        for i, row in enumerate(X):
            if i in chosen:
                continue
            d = dist(row, c)
            if d < best_d:
                best, best_d = i, d
        chosen.append(best)
    return chosen


def covering_radius(X, chosen) -> float:
    """max over rows of the distance to the nearest chosen row."""
    return max(min(dist(row, X[j]) for j in chosen) for row in X)
