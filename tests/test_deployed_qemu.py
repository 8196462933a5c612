"""ONNX Runtime's int16 pair saturation for real, on an emulated x86 CPU without VNNI (qemu-user).

The machines calib is developed on have VNNI, so tests/test_deployed.py's real-kernel tests skip there.
``qemu-x86_64 -cpu Haswell`` runs Python and ONNX Runtime on an emulated AVX2-only CPU: MLAS reads CPUID
(emulated) and picks its u8 x s8 kernel on ``vpmaddubsw``, the one that saturates int16 pairs.
tests/emulated_int16.py runs there and reports; the assertions are here. /proc/cpuinfo is the host's
under qemu-user, so that script passes the CPU to calib explicitly, except in the pipeline run, where the
detection says VNNI and the check must find the saturation from the outputs alone.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

QEMU = shutil.which("qemu-x86_64")
HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or QEMU is None,
    reason="needs an x86_64 host with qemu-user (apt-get install qemu-user) to emulate a CPU without VNNI; "
           f"here: {platform.machine()}, qemu-x86_64 {'found' if QEMU else 'missing'}")


@pytest.fixture(scope="module")
def emulated() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    p = subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, str(HERE / "emulated_int16.py")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_the_emulated_cpu_has_avx2_without_vnni(emulated):
    assert emulated["cpuid"] == {"AVX2": True, "AVX512F": False, "AVX512VNNI": False}


def test_ort_saturates_int16_pairs_exactly_as_the_numpy_kernel_model(emulated):
    k = emulated["kernel"]
    assert k["pairs_saturated"] == 1.0 and k["largest_pair"] > 32767  # every pair of this conv overflows int16
    assert k["deployed_vs_saturating_model_max_abs"] == 0.0  # ORT's default session = saturating kernel model
    assert k["spec_vs_exact_model_max_abs"] < 1e-4  # the spec evaluation = exact int32 accumulation
    assert k["deployed_vs_spec"] > 0.5


def test_calib_detects_names_and_fixes_it(emulated):
    c = emulated["calib"]
    assert c["differs"] and c["rel_l2"] > 0.5 and c["culprits"] == ["conv"]
    assert c["nodes"]["conv"] > 0.5 and c["nodes"]["identity"] < 1e-3  # the identity conv never saturates
    # no VNNI: every fused node gets 7-bit weights, and the deployed graph then equals the spec
    assert c["weight_bits"] == {"conv": 7, "identity": 7} and c["float_nodes"] == []
    assert not c["fixed_differs"] and c["fixed_rel_l2"] < 1e-3 and c["fixed_max_abs_q"] == 64


def test_quantize_for_ort_sees_it_from_the_outputs_alone(emulated):
    # the pipeline's own CPU detection reads the host's /proc/cpuinfo; whatever it says, the check runs
    # ORT's default session against the spec evaluation and finds the saturating conv
    q = emulated["quantize"]
    assert q["before_differs"] and q["fused_nodes"] == ["conv"] and q["weight_bits"].get("conv") == 7
    assert not q["after_differs"] and q["written_max_abs_q"] == 64
    assert "fixed with 7-bit weights" in q["line"]
