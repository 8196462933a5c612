"""Regenerates the committed inputs of the tests/bad_inputs/core_* cases (run from the repo root:
``python tests/bad_inputs/core_build.py``). Each case folder holds its broken input and
``expected.txt``, the text the error line must contain; tests/test_cli_core.py runs them."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

import models  # noqa: E402


def main() -> None:
    mlp = models.gemm_mlp()  # input x (N, 10) float32
    rng = np.random.default_rng(0)
    good = rng.normal(0, 1, (6, 10)).astype(np.float32)

    (HERE / "core_not_onnx").mkdir(exist_ok=True)
    (HERE / "core_not_onnx" / "model.onnx").write_text("name,label\nimg1.png,3\n")

    (HERE / "core_truncated_protobuf").mkdir(exist_ok=True)
    blob = models.cnn_residual().SerializeToString()
    (HERE / "core_truncated_protobuf" / "model.onnx").write_bytes(blob[: len(blob) // 2])

    case = HERE / "core_external_data_outside"
    case.mkdir(exist_ok=True)
    m = onnx.ModelProto()
    m.CopyFrom(mlp)
    for t in m.graph.initializer:
        if t.name == "w1":
            onnx.external_data_helper.set_external_data(t, location="../weights.bin", offset=0,
                                                        length=len(t.raw_data) or 4 * 160)
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
    (case / "model.onnx").write_bytes(m.SerializeToString())

    def npz(name: str, **arrays) -> None:
        (HERE / name).mkdir(exist_ok=True)
        with open(HERE / name / "data.npz", "wb") as f:
            np.savez(f, **arrays)

    npz("core_data_wrong_name", input=good)
    npz("core_data_wrong_shape", x=rng.normal(0, 1, (6, 12)).astype(np.float32))
    npz("core_data_wrong_dtype", x=np.arange(60, dtype=np.int64).reshape(6, 10))
    npz("core_data_empty", x=np.zeros((0, 10), np.float32))
    bad = good.copy()
    bad[3, 7] = np.nan
    bad[3, 2] = np.inf
    npz("core_data_nan", x=bad)
    npz("core_data_object_array", x=np.array([good[0], "not a number", None], dtype=object))


if __name__ == "__main__":
    main()
