"""Run under ``qemu-x86_64 -cpu Haswell`` (an emulated AVX2-only x86 CPU, no VNNI) by tests/test_deployed_qemu.py.

ONNX Runtime's MLAS picks its kernel from CPUID, which qemu-user emulates: the u8 x s8 GEMM runs on
``vpmaddubsw`` (pairs added into int16 with saturation), as on a real AVX2-only CPU. /proc/cpuinfo is
not emulated (it still lists the host's flags), so the CPU is passed to calib explicitly here.
Prints one JSON document: what ONNX Runtime computed, the numpy model of the saturating kernel, calib's
detection, its fix, and ``quantize`` for the ORT target on the same conv.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference.int16_pairs import conv1x1_accumulators, requantize  # noqa: E402
from test_deployed import AVX2_ONLY, COUT, CIN, _inits, relu6_like_conv  # noqa: E402

from calib.compare.deployed import fix_deployed, run_outputs, verify_deployed  # noqa: E402
from calib.export.qdq import export_qdq  # noqa: E402


def _rel(a, b) -> float:
    return float(np.linalg.norm((a - b).ravel()) / np.linalg.norm(b.ravel()))


def kernel_vs_reference() -> dict:
    """ORT's default session and the spec evaluation against the numpy model, saturating and exact."""
    model, ranges, feeds = relu6_like_conv()
    q = export_qdq(model, ranges, placement="ort")
    i = _inits(q.model)
    x_s8 = np.clip(np.rint(feeds[0]["x"][0] / i["x_scale"]), -128, 127)
    args = (float(i["x_scale"]), i["W_w_scale"].astype(np.float64), float(i["c_scale"]))
    sat = conv1x1_accumulators(x_s8, i["W_int8"][:, :, 0, 0], saturate=True)
    exact = conv1x1_accumulators(x_s8, i["W_int8"][:, :, 0, 0], saturate=False)
    dep = run_outputs(q.model, feeds[:1], "all")[0]["y"][0].reshape(COUT, -1)
    spec = run_outputs(q.model, feeds[:1], "disable")[0]["y"][0].reshape(COUT, -1)
    pairs = np.abs(i["W_int8"][:, 0::2, 0, 0, None] * (x_s8[0::2].reshape(CIN // 2, -1) + 128)
                   + i["W_int8"][:, 1::2, 0, 0, None] * (x_s8[1::2].reshape(CIN // 2, -1) + 128))
    return {"deployed_vs_spec": _rel(dep, spec),
            "deployed_vs_saturating_model_max_abs": float(np.abs(dep - np.maximum(requantize(sat, *args), 0)).max()),
            "spec_vs_exact_model_max_abs": float(np.abs(spec - np.maximum(requantize(exact, *args), 0)).max()),
            "pairs_saturated": float((pairs > 32767).mean()), "largest_pair": int(pairs.max())}


def detect_and_fix() -> dict:
    model, ranges, feeds = relu6_like_conv()
    report = verify_deployed(export_qdq(model, ranges, placement="ort").model, feeds, cpu=AVX2_ONLY)
    fix = fix_deployed(model, ranges, feeds, cpu=AVX2_ONLY, placement="ort")
    w = _inits(fix.qdq.model)["W_int8"]
    return {"differs": report.differs, "rel_l2": report.outputs[0].rel_l2, "culprits": report.culprits,
            "nodes": {n.node: n.rel_l2 for n in report.nodes}, "weight_bits": fix.weight_bits,
            "float_nodes": fix.float_nodes, "fixed_differs": fix.report.differs,
            "fixed_rel_l2": fix.report.outputs[0].rel_l2, "fixed_max_abs_q": int(np.abs(w).max())}


def through_quantize() -> dict:
    """``quantize``'s plan for the ORT target (minmax only: the emulated CPU is slow), the CPU left to detection
    (it reads the host's /proc/cpuinfo: VNNI), so only the check itself can see the saturation."""
    from dataclasses import replace

    from calib.model import load_model
    from calib.pipeline.core import config_from_flags, run_plan
    from calib.pipeline.inputs import open_run_data
    from calib.pipeline.sinks import FileSink
    from calib.pipeline.steps import Context

    model, _, _ = relu6_like_conv()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        onnx.save(model.proto, d / "m.onnx")
        np.savez(d / "d.npz", x=np.random.default_rng(5).uniform(5.7, 6.0, (24, CIN, 8, 8)).astype(np.float32))
        cfg = replace(config_from_flags(d / "m.onnx", d / "d.npz", method="minmax", placement="ort",
                                        auto_transforms=[]), methods=["minmax"])
        loaded = load_model(d / "m.onnx")
        ctx = run_plan(Context(cfg, loaded, open_run_data(d / "d.npz", loaded), None, None), FileSink(d / "q.onnx"))
        doc = ctx.deployed
        written = _inits(onnx.load(d / "q.onnx"))
        return {"before_differs": doc["before"]["differs"], "fused_nodes": doc["fused_nodes"],
                "weight_bits": doc["weight_bits"], "after_differs": doc["after"]["differs"],
                "has_vnni_detected": doc["has_vnni"], "written_max_abs_q": int(np.abs(written["W_int8"]).max()),
                "line": doc["line"]}


def cpuid_view() -> dict:
    """What this process's CPUID says (numpy's runtime dispatch reads it; qemu emulates it)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as f
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as f
    return {k: bool(f.get(k)) for k in ("AVX2", "AVX512F", "AVX512VNNI")}


if __name__ == "__main__":
    print(json.dumps({"cpuid": cpuid_view(), "kernel": kernel_vs_reference(), "calib": detect_and_fix(), "quantize": through_quantize()}))
