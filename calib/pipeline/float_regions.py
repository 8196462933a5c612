"""``auto``'s float-region candidate for the ONNX Runtime target: elementwise regions left in float where the
int8 they would run in costs the outputs more than it is worth.

The ORT placement quantizes the inputs and outputs of every op ONNX Runtime has an int8 kernel for
(``calib.export.placement.ort_rules``), elementwise Add/Mul/Softmax/Sigmoid included, so int8 kernels
chain. Inside a normalisation written out as elementwise ops that is harmful: a LayerNorm computed as
E[x²] − E[x]² subtracts two nearly equal numbers, so the int8 rounding of each (about 1/254 of its range) is
amplified by their ratio to the difference (magika: the variance's SQNR falls from 36 dB to 8 dB and the
model agrees with FP32 on 4 % of files; ONNX Runtime's own ``quantize_static`` and NNCF, which place the same
way, score 3 %). A tanh-GELU's x³ does the same in milder form. TensorRT's placement quantizes only the
inputs of Conv/Gemm/MatMul and never meets this.

A *region* is a connected part of the graph once Conv/ConvTranspose/Gemm/MatMul nodes are removed, holding
at least one quantized elementwise node (``ELEMENTWISE``). Floating a region keeps its nodes and the tensors
they exchange unquantized; the tensors the weighted nodes read stay quantized (their int8 kernels need
them). Regions are tried in graph order, each scored against the current model on the *selection* samples
and kept only if the paired per-sample test says it helps (``calib.pipeline.scoring.keep_change``) *and* the
outputs' SQNR gains at least ``MIN_GAIN_DB`` (6 dB) there: fewer roundings always lower the error a little
(up to 3 dB for a requantization at the same scale), but a float region costs speed, so only amplified error
pays for it. The result is never worse there than the all-int8 placement; the effect of all kept regions
together is then measured on the held-out (or report) samples, for the report only. A float region runs in
FP32 between DequantizeLinear and QuantizeLinear nodes.

Budget: a region whose scoring does not fit before verify's reserve is not tried (recorded as cut).
"""

from __future__ import annotations

import logging
from typing import Any

from calib.export.placement import ORT_INT8_OPS
from calib.model import WEIGHTED_OPS, Model
from calib.pipeline.budget import heldout_cost, region_cost, verify_cost
from calib.pipeline.scoring import keep_change, score_pair, transform_record
from calib.pipeline.steps import Context, export_shipped

__all__ = ["ELEMENTWISE", "NAME", "float_regions_step", "regions"]

log = logging.getLogger(__name__)

NAME = "float_regions"
# A region stays float only if the outputs' SQNR gains this much on the selection samples: 6 dB, one bit. One
# more int8 rounding of a tensor already rounded at the same scale at most doubles the noise power (3 dB), so
# only amplification (cancellation, a cube) can pay for what leaving the int8 kernel chain costs in speed.
MIN_GAIN_DB = 6.0
ELEMENTWISE = frozenset({"Add", "Mul", "Softmax", "Sigmoid", "LeakyRelu"}) & ORT_INT8_OPS


def regions(model: Model, quantized: set[str]) -> list[tuple[list[str], list[str]]]:
    """(nodes, tensors to keep float) of each region with a quantized elementwise node, in graph order.

    Nodes are connected through the tensors they exchange; Conv/ConvTranspose/Gemm/MatMul nodes are not part
    of any region (they cut the graph), and a tensor a weighted node reads is never kept float."""
    nodes = [n for n in model.graph.node if n.op_type not in WEIGHTED_OPS]
    parent = {n.name: n.name for n in nodes}

    def find(a: str) -> str:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    prod = {o: n.name for n in nodes for o in n.output if o}
    for n in nodes:
        for t in n.input:
            if t in prod:
                parent[find(n.name)] = find(prod[t])
    groups: dict[str, list[str]] = {}
    for n in nodes:
        groups.setdefault(find(n.name), []).append(n.name)
    weighted_reads = {t for n in model.graph.node if n.op_type in WEIGHTED_OPS for t in n.input}
    out = []
    for members in groups.values():
        if not any(model.nodes[m].op_type in ELEMENTWISE and m in quantized for m in members):
            continue
        inside = set(members)
        tensors = {t for m in members for t in list(model.nodes[m].input) + list(model.nodes[m].output)
                   if t and (t in prod and prod[t] in inside) and t not in weighted_reads}
        out.append((members, sorted(tensors)))
    return out


def float_regions_step(ctx: Context) -> None:
    """``auto`` with the ORT placement: try each region in float, keep those the selection samples say help."""
    c = ctx.cfg
    if c.primary != "auto" or ctx.sel is None or c.placement != "ort" or NAME not in c.auto_transforms:
        return
    base = ctx.base or ctx.model
    found = regions(base, set(ctx.qdq.quantized_nodes))
    if not found:
        ctx.transforms.append(transform_record(NAME, [], False, None, None, target=c.target,
                                               why="no quantized elementwise region"))
        return
    kw: dict[str, Any] = dict(batch_size=c.batch_size, metric=c.compare_metric, providers=c.providers,
                              progress=ctx.progress)
    start, kept, gains = ctx.qdq, [], []
    for k, (members, tensors) in enumerate(found, 1):
        if ctx.budget.skip(f"{NAME}: region {k} of {len(found)}", region_cost(ctx), verify_cost(ctx)):
            break
        cand = export_shipped(ctx, floats=[*members, *tensors])
        ms, outs = score_pair(ctx.model, ctx.qdq.model, cand.model, ctx.sel, outputs=True,
                              stage=f"{NAME}: region {k} of {len(found)}", **kw)
        keep, gain = keep_change(outs, c.target)
        if keep and _worth_it(ms):
            ctx.floats.extend([*members, *tensors])
            ctx.qdq = cand
            kept.append(members)
            gains.append(gain)
    _record(ctx, start, kept, gains, len(found), kw)


def _worth_it(ms: dict) -> bool:
    """Float costs speed (the region leaves ONNX Runtime's int8 kernel chain): only for a clear gain."""
    a, b = ms["with"].get("sqnr_db"), ms["without"].get("sqnr_db")
    if not all(isinstance(v, (int, float)) and v == v for v in (a, b)):
        return True  # no SQNR (a custom metric): the paired test alone decided
    return a - b >= MIN_GAIN_DB


def _record(ctx: Context, start, kept: list[list[str]], gains: list, n_regions: int, kw: dict) -> None:
    c = ctx.cfg
    nodes = [m for r in kept for m in r]
    sel = held = None
    if kept:
        sel = score_pair(ctx.model, start.model, ctx.qdq.model, ctx.sel, stage=f"{NAME}: selection effect", **kw)
        if ctx.ev is not None and not ctx.budget.skip(f"{NAME}: held-out effect", heldout_cost(ctx),
                                                      verify_cost(ctx)):
            held = score_pair(ctx.model, start.model, ctx.qdq.model, ctx.ev, stage=f"{NAME}: held-out effect", **kw)
        if ctx.advice is not None:
            ctx.advice.qdq = ctx.qdq
    why = (f"{len(kept)} of {n_regions} region(s) kept in float: each gained at least {MIN_GAIN_DB:g} dB output "
           "SQNR on the selection samples (and the paired test)" if kept else
           f"none of {n_regions} region(s) gained {MIN_GAIN_DB:g} dB output SQNR in float on the selection samples")
    ctx.transforms.append(transform_record(NAME, nodes, bool(kept), sel, held, target=c.target, why=why,
                                           in_sample=ctx.in_sample, paired=gains[-1] if gains else None))
    log.info("%s: %s", NAME, why)
