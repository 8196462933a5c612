"""Sensitivity: which quantized node costs how much accuracy.

For every quantized node X (a node reading at least one input through a Q/DQ
chain) two variants are measured at the graph outputs against FP32:

* **quantized alone**: every other node reads float; only X reads its Q/DQ
  inputs. Low output SQNR = X alone hurts.
* **float alone**: everything stays quantized except X, which reads float
  inputs (float weights included). High output SQNR = leaving X in float helps.

Work is shared: the "all float" and "all quantized" models are bases, each
variant copies only X and what is downstream of it (``calib.compare.variants``),
several variants run in one ONNX Runtime session, FP32 outputs are computed once
per batch, and the loop stops once the top of both rankings has not changed for
``patience`` consecutive batches (after ``min_samples``).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import onnx

from calib.compare.evaluate import Evaluator, Session
from calib.compare.mapping import TensorMap, map_models
from calib.compare.targets import OutputMetrics
from calib.compare.variants import (Variant, apply_edits, build_multi, float_node_variant, group_variants, prune,
                                    quantize_only_variant)
from calib.model import Model, as_model, as_qdq_model

__all__ = ["Sensitivity", "sensitivity", "node_variants"]

log = logging.getLogger(__name__)
Progress = Callable[[str, int, "int | None"], None]


@dataclass
class Sensitivity:
    """Per quantized node: output metrics with only it quantized and with only it in float.

    ``rows`` are ranked most harmful first (lowest output SQNR when quantized alone).
    """

    rows: list[dict[str, Any]]
    all_quantized: dict[str, float]
    all_float: dict[str, float]
    n_samples: int
    stopped_early: bool
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ranking(self) -> list[str]:
        return [r["node"] for r in self.rows]

    def float_order(self) -> list[str]:
        """Nodes ordered by how much leaving each alone in float helps (most first)."""
        return [r["node"] for r in sorted(self.rows, key=lambda r: (-_num(r["float_only"]["sqnr_db"]),
                                                                     _num(r["quant_only"]["sqnr_db"])))]

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "all_quantized": self.all_quantized, "all_float": self.all_float,
                "n_samples": self.n_samples, "stopped_early": self.stopped_early, "seconds": round(self.seconds, 3),
                "notes": self.notes,
                "definitions": {"quant_only": "only this node reads Q/DQ inputs; output metrics vs FP32",
                                "float_only": "every quantized node except this one reads Q/DQ inputs"}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Sensitivity":
        return cls(d["rows"], d["all_quantized"], d["all_float"], d["n_samples"], d["stopped_early"],
                   d.get("seconds", 0.0), d.get("notes", []))


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) else float(str(x))


def _summary(m: OutputMetrics) -> dict[str, float]:
    out = {"cosine": m.value("cosine"), "sqnr_db": m.value("sqnr")}
    if m.tasks:
        out["top1"] = m.value("top1")
    return out


def node_variants(tm: TensorMap) -> tuple[onnx.ModelProto, onnx.ModelProto, list[Variant], list[Variant], list[str]]:
    """Bases (all float, all quantized) and the two variants of every quantized node."""
    nodes = list(tm.quantized)
    floats = [float_node_variant(tm, n, f"f{i}") for i, n in enumerate(nodes)]
    quant_base = copy.deepcopy(tm.qdq.proto)
    have = {t.name for t in quant_base.graph.initializer}
    for v in floats:
        for t in v.initializers:
            if t.name not in have:
                quant_base.graph.initializer.append(t)
                have.add(t.name)
        v.initializers = []
    float_base = copy.deepcopy(quant_base)
    apply_edits(float_base, Variant("all_float", [e for v in floats for e in v.edits],
                                    [n for v in floats for n in v.nodes]))  # Casts of an FP16 model
    quants = [quantize_only_variant(tm, n, f"q{i}") for i, n in enumerate(nodes)]
    notes = [f"{n}: {v.note}" for n, v in zip(nodes, floats) if v.note]
    return float_base, quant_base, quants, floats, notes


def _sessions(base: onnx.ModelProto, variants: list[Variant], outputs: list[str], budget: int) -> list[Session]:
    out = []
    for group in group_variants(base, variants, budget):
        proto, where = build_multi(base, group, outputs)
        prune(proto, {t for w in where.values() for t in w.values()})
        out.append(Session(proto, where))
    return out


def sensitivity(fp32: Model | str, qdq: Any, source, *, batch_size: int = 16, max_samples: int = 256,
                min_samples: int = 32, patience: int = 2, top_k: int = 10, optimization: str = "disable",
                providers: Sequence[str] | None = None, tensor_map: TensorMap | None = None,
                nodes_per_session: int | None = None, progress: Progress | None = None) -> Sensitivity:
    """Rank the Q/DQ model's quantized nodes by the output error each causes (see the module docstring)."""
    t0 = time.perf_counter()
    fm = as_model(fp32)
    tm = tensor_map or map_models(fm, as_qdq_model(qdq))
    nodes = list(tm.quantized)
    outputs = list(fm.output_names)
    float_base, quant_base, quants, floats, notes = node_variants(tm)
    budget = nodes_per_session or max(4 * len(quant_base.graph.node), 64)
    sessions = _sessions(float_base, quants, outputs, budget) + _sessions(quant_base, floats, outputs, budget)
    n_quant_sessions = len(group_variants(float_base, quants, budget)) if quants else 0
    if not quants:
        sessions = [Session(float_base, {"base": {o: o for o in outputs}}),
                    Session(quant_base, {"base": {o: o for o in outputs}})]
        n_quant_sessions = 1
    ev = Evaluator(fm, source, batch_size=batch_size, optimization=optimization, providers=providers,
                   limit=max_samples)
    state = {"prev": None, "stable": 0, "early": False}

    def ranks(metrics) -> tuple:
        q = sorted(range(len(nodes)), key=lambda i: metrics[f"q{i}"].value("sqnr"))[:top_k]
        f = sorted(range(len(nodes)), key=lambda i: -metrics[f"f{i}"].value("sqnr"))[:top_k]
        return tuple(q), tuple(f)

    def stop(metrics, done: int) -> bool:
        if not nodes:
            return False
        r = ranks(metrics)
        state["stable"] = state["stable"] + 1 if r == state["prev"] else 0
        state["prev"] = r
        if done >= min_samples and state["stable"] >= patience and done < ev.n_samples:
            state["early"] = True
            return True
        return False

    metrics, done = ev.evaluate(sessions, stage="sensitivity", progress=progress, stop=stop)
    all_float = _summary(metrics["base"])
    all_quant = _summary(metrics[f"base{n_quant_sessions}"] if f"base{n_quant_sessions}" in metrics
                         else metrics["base"])
    rows = []
    depth = fm.depth
    for i, n in enumerate(nodes):
        rows.append({"node": n, "op_type": fm.nodes[n].op_type, "depth": depth[n],
                     "quantized_inputs": [q.index for q in tm.quantized[n]],
                     "quant_only": _summary(metrics[f"q{i}"]), "float_only": _summary(metrics[f"f{i}"])})
    rows.sort(key=lambda r: (r["quant_only"]["sqnr_db"], -r["float_only"]["sqnr_db"]))
    for k, r in enumerate(rows):
        r["rank"] = k + 1
    if math.isfinite(all_float["sqnr_db"]) and all_float["sqnr_db"] < 60:
        notes.append(f"the all-float reconstruction differs from FP32 (SQNR {all_float['sqnr_db']:.1f} dB): "
                     "float weights could not be recovered exactly")
    return Sensitivity(rows, all_quant, all_float, done, state["early"], time.perf_counter() - t0, notes)
