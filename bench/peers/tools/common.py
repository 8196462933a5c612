"""Helpers shared by the tool jobs. Imported by path inside each tool's own venv: numpy only, plus
onnxruntime's CalibrationDataReader where the tool has it."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

BATCH = 20  # calibration batch size, the same for every tool at N = 100, 500 and 2000 (it divides them): ONNX
# Runtime's histogram calibrators np.asarray() the list of per-batch outputs and fail when the last batch is
# shorter, so at other N every tool takes the largest batch up to BATCH that divides N (16 at N = 128)


def batch_for(n: int, batch: int = BATCH) -> int:
    """The largest batch size up to ``batch`` that divides ``n`` (every batch the same shape)."""
    return next(b for b in range(min(batch, max(n, 1)), 0, -1) if n % b == 0) if n else batch


def load_npz(path: str | Path) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Arrays keyed by model input name (first axis = sample) and the optional ``labels``."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    labels = arrays.pop("labels", None)
    return arrays, labels


def batches(arrays: dict[str, np.ndarray], batch: int = BATCH) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(arrays.values())))
    batch = batch_for(n, batch)
    return [{k: v[i : i + batch] for k, v in arrays.items()} for i in range(0, n, batch)]


def make_reader(arrays: dict[str, np.ndarray], batch: int = BATCH):
    """An onnxruntime CalibrationDataReader over the samples, in order, ``batch`` at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class NpzReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = batches(arrays, batch)
            self._i = 0

        def get_next(self):
            if self._i >= len(self._items):
                return None
            self._i += 1
            return self._items[self._i - 1]

        def get_first(self):  # ModelOpt reads the first batch to find output shapes
            return self._items[0] if self._items else None

        def __len__(self) -> int:
            return len(self._items)

        def rewind(self) -> None:
            self._i = 0

        def set_range(self, start_index: int, end_index: int) -> None:
            self._items = self._items[start_index:end_index]
            self._i = 0

    return NpzReader()


class Phases:
    """Wall-clock of named phases inside a job, written with the job's result."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.times: dict[str, float] = {}
        self._last = self.t0

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = round(now - self._last, 3)
        self._last = now


def write_result(out_dir: str | Path, payload: dict) -> None:
    out = Path(out_dir) / "result.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, out)


def versions(*modules: str) -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for m in modules:
        try:
            mod = __import__(m)
            out[m] = getattr(mod, "__version__", "?")
        except Exception as e:  # a missing optional module is recorded, not fatal
            out[m] = f"unavailable: {e}"
    return out


def job_args(methods: list[str]) -> argparse.Namespace:
    """The arguments every peer quantization job takes: model, calibration data, output folder, method."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--method", required=True, choices=methods)
    return ap.parse_args()
