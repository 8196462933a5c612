"""The plan's deployed-runtime check: run the shipped model the way its target runtime will.

- ORT target (``placement = "ort"``): ONNX Runtime with its default graph optimisation and only the real
  outputs marked, against the spec evaluation (optimisation off), on the *selection* samples (or, when the
  plan made no split, the calibration samples: nothing is reported on either). Fused nodes whose result
  differs are named and fixed (``calib.compare.deployed.repair_deployed``): 7-bit weights on them, or on
  every fused node when the CPU lacks VNNI (detected here, or declared with ``deploy_cpu = "no-vnni"`` for
  a deployment CPU other than this one), and float for a node 7 bits do not fix. The model checked is the one
  written: biases as int32 (``calib.export.int32_bias``), so the fused kernels add what the spec adds.
- TensorRT target: TensorRT computes Q/DQ as the ONNX spec defines it, so the spec evaluation that every
  calib figure uses is the deployed one; nothing else runs.

The result is ``Context.deployed`` (JSON-ready, with a one-line ``line`` for the CLI).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from calib.compare.deployed import fix_json, repair_deployed
from calib.cpu import CpuFeatures, cpu_features
from calib.data.base import batches, limited
from calib.export.int32_bias import with_int32_biases
from calib.pipeline.steps import Context, export_shipped

__all__ = ["deployed_step", "target_cpu", "sample_feeds", "DEPLOYED_SAMPLES", "TRT_NOTE"]

DEPLOYED_SAMPLES = 32  # samples the deployed and spec sessions both run
TRT_NOTE = ("TensorRT runs Q/DQ as the ONNX spec defines it: the spec evaluation calib measures is the "
            "deployed one")


def target_cpu(declared: str) -> CpuFeatures:
    """This machine's CPU features, or the ones declared for the deployment CPU."""
    here = cpu_features()
    if declared == "no-vnni":
        return CpuFeatures(True, frozenset({"avx2"}), "declared: x86 without VNNI (deploy_cpu = no-vnni)", "x86_64")
    if declared == "vnni":
        return CpuFeatures(True, frozenset({"avx2", "avx512_vnni"}), "declared: x86 with VNNI (deploy_cpu = vnni)",
                           "x86_64")
    return here


def sample_feeds(ctx: Context, source, n: int) -> list[dict[str, np.ndarray]]:
    """The first ``n`` samples of ``source`` as model feeds (batches of ``batch_size``)."""
    layout = getattr(source, "layout", "batch")
    return [f for _, f, _ in batches(limited(source, n), ctx.model.inputs, ctx.cfg.batch_size, layout=layout)]


def _line(doc: dict[str, Any]) -> str:
    after = max((o["rel_l2"] for o in doc["after"]["outputs"]), default=0.0)
    before = max((o["rel_l2"] for o in doc["before"]["outputs"]), default=0.0)
    head = f"deployed check (ONNX Runtime default optimisation vs spec, {doc['samples']} {doc['measured_on']} " \
           f"samples; CPU {doc['cpu']}): "
    fixed = bool(doc["weight_bits"] or doc["float_nodes"])
    fix = f"7-bit weights on {len(doc['weight_bits'])} node(s)" + \
        (f", float: {', '.join(doc['float_nodes'])}" if doc["float_nodes"] else "")
    if not doc["before"]["differs"]:
        return head + f"equal within noise (relative error {before:.2g})" + \
            (f"; {fix} since the CPU lacks VNNI (relative error now {after:.2g})" if fixed else "")
    if not fixed:
        return head + f"relative error {before:.2g}, no fused node differs alone (the fused kernels' rounding " \
                      "adds up) and 7-bit weights did not lower it: written as is"
    fused = f"fused node(s) {', '.join(doc['fused_nodes'])} " if doc["fused_nodes"] else ""
    verb = "lowered" if doc["after"]["differs"] else "fixed"
    return head + f"{fused}relative error {before:.2g} -> {verb} with {fix}; now {after:.2g}"


def deployed_step(ctx: Context) -> None:
    c = ctx.cfg
    if c.placement != "ort":
        ctx.deployed = {"runtime": "tensorrt", "note": TRT_NOTE, "line": "deployed check: " + TRT_NOTE}
        return
    source, label = (ctx.sel, "selection") if ctx.sel is not None else (ctx.source, "calibration")
    feeds = sample_feeds(ctx, source, DEPLOYED_SAMPLES)
    n = sum(len(next(iter(f.values()))) for f in feeds) if getattr(source, "layout", "batch") == "batch" \
        else len(feeds)
    # checked as written: int32 biases (calib.export.int32_bias; ``ctx.qdq`` keeps float ones for bias correction)
    fix = repair_deployed(with_int32_biases(ctx.qdq),
                          lambda bits, floats: with_int32_biases(export_shipped(ctx, weight_bits=bits, floats=floats)),
                          feeds, cpu=target_cpu(c.deploy_cpu), providers=c.providers, proactive=True)
    doc = {**fix_json(fix), "samples": n, "measured_on": label, "declared_cpu": c.deploy_cpu or None}
    doc["line"] = _line(doc)
    ctx.deployed = doc
    if fix.weight_bits or fix.float_nodes:
        ctx.qdq = export_shipped(ctx, weight_bits=fix.weight_bits, floats=fix.float_nodes)
        if ctx.advice is not None:
            ctx.advice.qdq = ctx.qdq
