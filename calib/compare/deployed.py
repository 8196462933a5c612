"""Verify a Q/DQ model on the runtime that will run it: ONNX Runtime CPU, default optimisation.

calib's compare and advise evaluate Q/DQ as the ONNX spec defines it (graph
optimisation off, what TensorRT computes). ONNX Runtime's default session fuses
DQ -> Conv/MatMul -> Q into integer kernels whose arithmetic can differ: on x86
without VNNI, u8 x s8 pairs are added into int16 with saturation (see calib.cpu).
Marking intermediate tensors as outputs stops those fusions, so here only the
model's real outputs are compared (``compare_deployed``). When they differ beyond
noise, every fusable weighted node is run alone, as a one-node sub-model (its
DQs, the node, and the Q that reads its output) fed with the exact run's int8
inputs, optimisation on vs off (``check_fused_nodes``): the nodes whose results
differ are the ones responsible. ``fix_deployed`` re-exports with 7-bit weights
(|q| <= 64: no int16 pair can saturate; still symmetric int8, zero point 0, valid
for TensorRT) on those nodes, or on all weighted nodes when the CPU lacks VNNI,
and keeps a node float when 7 bits are not enough.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from calib.collect import expose_outputs, make_session
from calib.cpu import CpuFeatures, cpu_features
from calib.export.qdq import QdqModel, export_qdq
from calib.model import Model

__all__ = ["OutputDiff", "NodeCheck", "DeployedReport", "DeployedFix", "run_outputs", "compare_deployed",
           "fusable_nodes", "node_submodel", "check_fused_nodes", "verify_deployed", "fix_targets", "fix_deployed",
           "deployed_json", "repair_deployed", "fix_json",
           "OUTPUT_TOLERANCE", "NODE_TOLERANCE"]

log = logging.getLogger(__name__)

# relative L2 error ||deployed - spec|| / ||spec||: requantisation in fused kernels rounds differently
# (a few 1-LSB changes give ~1e-3); the int16 saturation gives 0.1-0.8
OUTPUT_TOLERANCE = 0.02
NODE_TOLERANCE = 0.02
# with no fused node to blame, 7-bit weights must at least halve the deployed-vs-spec error to be kept
SEVEN_BIT_GAIN = 0.5
WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
_LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}


@dataclass(frozen=True)
class OutputDiff:
    name: str
    rel_l2: float  # ||deployed - spec|| / ||spec|| over all samples
    max_abs: float


@dataclass(frozen=True)
class NodeCheck:
    node: str
    op_type: str
    rel_l2: float  # of the one-node sub-model, optimisation on vs off


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    d = float(np.linalg.norm((a.astype(np.float64) - b.astype(np.float64)).ravel()))
    n = float(np.linalg.norm(b.astype(np.float64).ravel()))
    return d / n if n > 0 else (0.0 if d == 0 else float("inf"))


@dataclass
class DeployedReport:
    """Spec (optimisation off) vs deployed (ORT default) outputs, and the fused nodes checked."""

    cpu: CpuFeatures
    outputs: list[OutputDiff]
    nodes: list[NodeCheck] = field(default_factory=list)
    tolerance: float = OUTPUT_TOLERANCE

    @property
    def differs(self) -> bool:
        return any(not o.rel_l2 <= self.tolerance for o in self.outputs)

    @property
    def culprits(self) -> list[str]:
        return [n.node for n in self.nodes if not n.rel_l2 <= NODE_TOLERANCE]

    def summary(self) -> str:
        lines = [f"CPU: {self.cpu.describe()}"]
        for o in self.outputs:
            lines.append(f"output '{o.name}': deployed vs spec relative error {o.rel_l2:.4g} "
                         f"(max abs {o.max_abs:.4g}){' DIFFERS' if not o.rel_l2 <= self.tolerance else ''}")
        for n in self.nodes:
            if not n.rel_l2 <= NODE_TOLERANCE:
                lines.append(f"fused {n.op_type} '{n.node}': relative error {n.rel_l2:.4g} vs its exact result")
        if not self.differs:
            lines.append("deployed graph equals the spec evaluation within noise")
        return "\n".join(lines)


def deployed_json(report: DeployedReport) -> dict:
    """The ``*.deployed.json`` document written by ``calib compare --deployed``."""
    return {"format": "calib.deployed", "version": 1, "cpu": {"known": report.cpu.known, "has_vnni": report.cpu.has_vnni,
            "flags": sorted(f for f in report.cpu.flags if f.startswith(("avx", "amx"))), "model": report.cpu.model_name},
            "tolerance": report.tolerance, "differs": report.differs, "culprits": report.culprits,
            "outputs": [{"name": o.name, "rel_l2": o.rel_l2, "max_abs": o.max_abs} for o in report.outputs],
            "nodes": [{"node": n.node, "op_type": n.op_type, "rel_l2": n.rel_l2} for n in report.nodes]}


def run_outputs(proto: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]], optimization: str = "all",
                outputs: Sequence[str] | None = None, providers=None) -> list[dict[str, np.ndarray]]:
    """Run ``proto`` on every feed; only its real outputs (plus ``outputs``) are marked."""
    m = expose_outputs(proto, outputs) if outputs else proto
    sess = make_session(m, providers, optimization=_LEVELS[optimization])
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(names, f))) for f in feeds]


def compare_deployed(proto: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]],
                     providers=None) -> list[OutputDiff]:
    """Each real output, deployed (ORT_ENABLE_ALL) vs spec (ORT_DISABLE_ALL), over all feeds."""
    spec = run_outputs(proto, feeds, "disable", providers=providers)
    dep = run_outputs(proto, feeds, "all", providers=providers)
    out = []
    for o in proto.graph.output:
        s = np.concatenate([r[o.name].ravel() for r in spec])
        d = np.concatenate([r[o.name].ravel() for r in dep])
        diff = float(np.abs(d.astype(np.float64) - s).max()) if s.size else 0.0
        out.append(OutputDiff(o.name, _rel(d, s), diff))
    return out


def _producers(g: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in g.node for o in n.output}


def fusable_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Weighted nodes whose first two inputs come from DequantizeLinear (what ORT fuses into int8 kernels)."""
    prod = _producers(proto.graph)
    out = []
    for n in proto.graph.node:
        if n.op_type in WEIGHTED_OPS and len(n.input) >= 2 and all(
                prod.get(t) is not None and prod[t].op_type == "DequantizeLinear" for t in n.input[:2]):
            out.append(n)
    return out


def _submodel_nodes(proto: onnx.ModelProto, node: onnx.NodeProto) -> tuple[list[onnx.NodeProto], list[str]]:
    g = proto.graph
    prod = _producers(g)
    inits = {i.name for i in g.initializer}
    dqs = [prod[t] for t in node.input if t in prod and prod[t].op_type == "DequantizeLinear"]
    # the Q before an activation's DQ too: ORT rewrites Q->DQ pairs (s8 -> u8 on x86) and fuses from there
    qs = [prod[d.input[0]] for d in dqs if d.input[0] in prod and prod[d.input[0]].op_type == "QuantizeLinear"]
    nodes = qs + dqs + [node]
    consumers = [n for n in g.node if node.output[0] in n.input]
    if len(consumers) == 1 and consumers[0].op_type == "QuantizeLinear":
        nodes.append(consumers[0])  # and the DQs reading it: ORT fuses only a Q that feeds a DQ
        nodes += [n for n in g.node if n.op_type == "DequantizeLinear" and consumers[0].output[0] in n.input][:1]
    produced = {o for n in nodes for o in n.output}
    feeds = [t for n in nodes for t in n.input if t and t not in produced and t not in inits]
    return nodes, list(dict.fromkeys(feeds))


def node_submodel(proto: onnx.ModelProto, node: onnx.NodeProto,
                  example: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, list[str]]:
    """(one-node model, its non-constant inputs): the node's Q->DQ inputs, the node, and the Q reading its output.

    ``example`` holds one value of each non-constant input (it gives their types)."""
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    nodes, feeds = _submodel_nodes(proto, node)
    used_inits = [inits[t] for t in dict.fromkeys(t for n in nodes for t in n.input) if t in inits]
    inputs = [helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(example[t].dtype),
                                            ["N", *example[t].shape[1:]] if example[t].ndim else [])
              for t in feeds]  # any batch size: the last batch of a feed list is often shorter
    outputs = [helper.make_empty_tensor_value_info(nodes[-1].output[0])]
    sub = helper.make_graph(nodes, f"{node.name}_alone", inputs, outputs, used_inits)
    m = helper.make_model(sub, opset_imports=list(proto.opset_import), ir_version=min(proto.ir_version, 10))
    return m, feeds


def check_fused_nodes(proto: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]],
                      nodes: Iterable[str] | None = None, max_samples: int = 4, providers=None) -> list[NodeCheck]:
    """Each fusable node alone, optimisation on vs off, on its exact inputs from the spec run; worst first."""
    cands = [n for n in fusable_nodes(proto) if nodes is None or n.name in set(nodes)]
    needs = {n.name: _submodel_nodes(proto, n)[1] for n in cands}
    wanted = sorted({t for f in needs.values() for t in f} - {i.name for i in proto.graph.input})
    samples = list(feeds)[:max_samples]
    exact = run_outputs(proto, samples, "disable", outputs=wanted, providers=providers)
    checks = []
    for n in cands:
        sub_feeds = [{t: (r[t] if t in r else f[t]) for t in needs[n.name]} for r, f in zip(exact, samples)]
        sub, _ = node_submodel(proto, n, sub_feeds[0])
        a = run_outputs(sub, sub_feeds, "all", providers=providers)
        b = run_outputs(sub, sub_feeds, "disable", providers=providers)
        out = sub.graph.output[0].name
        rel = _rel(np.concatenate([r[out].ravel() for r in a]), np.concatenate([r[out].ravel() for r in b]))
        checks.append(NodeCheck(n.name, n.op_type, rel))
    return sorted(checks, key=lambda c: -c.rel_l2)


def verify_deployed(proto: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]], *,
                    cpu: CpuFeatures | None = None, tolerance: float = OUTPUT_TOLERANCE,
                    providers=None) -> DeployedReport:
    """Compare deployed and spec outputs; when they differ, find the fused nodes responsible."""
    feeds = list(feeds)
    report = DeployedReport(cpu or cpu_features(), compare_deployed(proto, feeds, providers), tolerance=tolerance)
    if report.differs:
        report.nodes = check_fused_nodes(proto, feeds, providers=providers)
    return report


@dataclass
class DeployedFix:
    """What ``fix_deployed`` kept: the model, its check, and what was changed (empty: nothing needed)."""

    qdq: QdqModel
    report: DeployedReport
    before: DeployedReport
    weight_bits: dict[str, int] = field(default_factory=dict)
    float_nodes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [self.before.summary()]
        if self.weight_bits:
            parts.append(f"fix: 7-bit weights on {len(self.weight_bits)} node(s): {', '.join(sorted(self.weight_bits))}")
        if self.float_nodes:
            parts.append(f"fix: kept float: {', '.join(self.float_nodes)}")
        if self.weight_bits or self.float_nodes:
            parts.append("after the fix: " + self.report.summary().splitlines()[-1])
        return "\n".join(parts)


def fix_targets(report: DeployedReport, cpu: CpuFeatures, fusable: Sequence[str]) -> list[str]:
    """Nodes to give 7-bit weights: none if deployed equals spec; every fusable node when the CPU lacks VNNI
    (any of them can saturate on other data) or no single node was found; else the nodes found."""
    if not report.differs:
        return []
    if cpu.has_vnni is False or not report.culprits:
        return list(fusable)
    return [n for n in report.culprits if n in set(fusable)] or list(fusable)


def repair_deployed(qdq: QdqModel, export: Callable[[dict[str, int], list[str]], QdqModel],
                    feeds: Sequence[dict[str, np.ndarray]], *, cpu: CpuFeatures, tolerance: float = OUTPUT_TOLERANCE,
                    providers=None, proactive: bool = False) -> DeployedFix:
    """Verify ``qdq`` on ORT's default session and repair it: ``export(weight_bits, float_nodes)`` re-exports
    the same model with 7-bit weights on some nodes and some nodes kept float.

    ``proactive``: when the CPU lacks VNNI, every fusable node gets 7-bit weights even if these samples did
    not saturate (other data can; this is what a CPU declared without VNNI, e.g. the deployment target
    rather than this machine, needs: the check here cannot see saturation on a CPU with VNNI)."""
    feeds = list(feeds)
    before = verify_deployed(qdq.model, feeds, cpu=cpu, tolerance=tolerance, providers=providers)
    fusable = [n.name for n in fusable_nodes(qdq.model)]
    targets = fusable if proactive and cpu.has_vnni is False else fix_targets(before, cpu, fusable)
    if not targets:
        return DeployedFix(qdq, before, before)
    bits = {n: 7 for n in targets}
    qdq7 = export(bits, [])
    after = verify_deployed(qdq7.model, feeds, cpu=cpu, tolerance=tolerance, providers=providers)
    if not after.differs:
        return DeployedFix(qdq7, after, before, bits)
    still = after.culprits or before.culprits
    if not still:  # no fused node differs alone: fused kernels' rounding adds up; 7-bit weights cost precision,
        # so they are kept only if they at least halve the gap (ppocr_det: 0.083 -> 0.082 kept them on 64 nodes)
        return DeployedFix(qdq7, after, before, bits) if _worst(after) <= SEVEN_BIT_GAIN * _worst(before) else \
            DeployedFix(qdq, before, before)
    keep = {n: b for n, b in bits.items() if n not in still}
    qdqf = export(keep, still)
    final = verify_deployed(qdqf.model, feeds, cpu=cpu, tolerance=tolerance, providers=providers)
    log.info("deployed fix: 7-bit on %d nodes, float %s", len(keep), still)
    return DeployedFix(qdqf, final, before, keep, still)


def fix_deployed(model: Model, ranges, feeds: Sequence[dict[str, np.ndarray]], *, cpu: CpuFeatures | None = None,
                 tolerance: float = OUTPUT_TOLERANCE, providers=None, proactive: bool = False,
                 **export_kwargs: Any) -> DeployedFix:
    """Export, verify on ORT's default session, and repair (7-bit weights, then float) for the ORT target."""
    exclude = list(export_kwargs.pop("exclude", ()))

    def export(bits: dict[str, int], floats: list[str]) -> QdqModel:
        return export_qdq(model, ranges, weight_bits=bits or None, exclude=exclude + floats, **export_kwargs)

    return repair_deployed(export({}, []), export, feeds, cpu=cpu or cpu_features(), tolerance=tolerance,
                           providers=providers, proactive=proactive)


def _worst(report: DeployedReport) -> float:
    return max((o.rel_l2 for o in report.outputs), default=0.0)


def fix_json(fix: DeployedFix) -> dict:
    """What the deployed check saw before and after the repair, JSON-ready (the run's ``deployed`` entry)."""
    return {"runtime": "onnxruntime", "cpu": fix.before.cpu.describe(), "has_vnni": fix.before.cpu.has_vnni,
            "before": deployed_json(fix.before), "after": deployed_json(fix.report),
            "fused_nodes": fix.before.culprits, "weight_bits": dict(sorted(fix.weight_bits.items())),
            "float_nodes": list(fix.float_nodes)}
