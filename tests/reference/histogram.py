"""Reference histogram: ``np.histogram`` of all the data at once, at the final power-of-two width.

Written from calib.stats' documented layout (not from its code): bins of width w = 2**e on a grid
anchored at 0, bin k = [k*w, (k+1)*w); 32,768 bins; e is the smallest exponent >= -126 with
max|x| < 2048 * w; positive values (x >= 0, including -0.0) and negative values counted apart;
NaN/inf counted and left out of the histogram and of min/max.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_BINS = 1 << 15  # 32,768 (stats format version 2)
MIN_EXP = -126


def final_exponent(max_abs: float) -> int:
    """Smallest e >= MIN_EXP with max_abs < NUM_BINS * 2**e, found by counting up (slow, obvious)."""
    e = MIN_EXP
    while max_abs >= NUM_BINS * 2.0 ** e:
        e += 1
    return e


@dataclass
class RefStats:
    pos: np.ndarray
    neg: np.ndarray
    exp: int
    min: float
    max: float
    n: int
    n_nonfinite: int

    @property
    def abs_counts(self) -> np.ndarray:
        return self.pos + self.neg


def reference_stats(arrays) -> RefStats:
    """Statistics of every value of ``arrays`` (an array or a list of arrays), all at once."""
    if isinstance(arrays, np.ndarray):
        arrays = [arrays]
    flat = [np.asarray(a).astype(np.float64).reshape(-1) for a in arrays]
    x = np.concatenate(flat) if flat else np.zeros(0)
    finite = x[np.isfinite(x)]
    max_abs = float(np.abs(finite).max()) if finite.size else 0.0
    e = final_exponent(max_abs)
    edges = np.arange(NUM_BINS + 1, dtype=np.float64) * 2.0 ** e
    # np.histogram's last bin is closed on the right; max|x| < edges[-1], so that never matters here
    pos = np.histogram(finite[~(finite < 0)], bins=edges)[0].astype(np.int64)
    neg = np.histogram(-finite[finite < 0], bins=edges)[0].astype(np.int64)
    return RefStats(pos, neg, e,
                    float(finite.min()) if finite.size else float("inf"),
                    float(finite.max()) if finite.size else float("-inf"),
                    int(x.size), int(x.size - finite.size))
