"""Polygraphy ``--data-loader-script`` for the benchmark: yields the evaluation samples of the .npz named by
the environment variable BENCH_EVAL_NPZ, BENCH_BATCH at a time (same order and batches as ``calib compare``)."""

import os

import numpy as np


def load_data():
    batch = int(os.environ.get("BENCH_BATCH", "20"))
    with np.load(os.environ["BENCH_EVAL_NPZ"], allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "labels"}
    n = len(next(iter(arrays.values())))
    for i in range(0, n, batch):
        yield {k: v[i : i + batch] for k, v in arrays.items()}
