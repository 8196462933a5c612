"""The library leaves glibc's mmap threshold alone; the CLI sets it for its own process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_PROBE = """
import sys
import calib._memory as m
calls = []
m.steady_malloc = lambda *a, **k: calls.append(1) or True
{body}
print(len(calls))
"""


def _calls(body: str, tmp_path) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _PROBE.format(body=body)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.strip().splitlines()[-1])


def test_collect_does_not_touch_the_allocator(tmp_path):
    body = """
import numpy as np, onnx
from onnx import helper, TensorProto
from calib.collect import collect
from calib.data import ListSource, Sample
from calib.model import model_from_proto
g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
m = model_from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
st = collect(m, ListSource([Sample(str(i), {"x": np.full(4, i - 2, np.float32)}) for i in range(5)]))
assert st.tensors["y"].n == 20
"""
    assert _calls(body, tmp_path) == 0


def test_the_cli_sets_it(tmp_path):
    body = """
import calib.cli
calib.cli.main(["--quiet", "calibrate", "--help"])
"""
    assert _calls(body, tmp_path) == 1
