"""Rank quantized nodes for ``advise``, cheaply: local error first, then isolated sensitivity of a shortlist.

1. **Local error** (``calib.compare.local``): every quantized node run in INT8
   on FP32 inputs, in one pass over ``samples`` samples (FP32 model plus one
   copied node per quantized node: memory grows with the node count, not its square).
2. **Isolated sensitivity** of the ``shortlist`` nodes with the worst local
   SQNR: the current model with only that node in float, measured at the graph
   outputs on the same samples. Variants share sessions (``build_multi``), but
   sessions run one after another, so memory is bounded by one group. Past
   ``deadline`` no further group starts (the first one not past
   ``first_deadline``); the nodes not measured are ranked by local SQNR.

The order: shortlisted nodes by how much leaving each in float helps (output
SQNR, highest first; ties by local SQNR), then the rest by local SQNR (worst
first). The result is a ``Sensitivity`` whose ``rows`` are in that order; a row
holds ``local`` (metrics at the node's output) and ``float_only`` (output metrics,
NaN where not measured); ``quant_only`` is not measured here (NaN).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable, Sequence

from calib.compare.evaluate import Evaluator, Session
from calib.compare.local import local_errors
from calib.compare.mapping import TensorMap
from calib.compare.sensitivity import Sensitivity
from calib.compare.targets import OutputMetrics
from calib.compare.variants import build_multi, float_node_variant, group_variants, prune
from calib.model import Model

__all__ = ["rank_nodes", "RANK_SHARE"]

Progress = Callable[[str, int, "int | None"], None]
NAN = {"cosine": math.nan, "sqnr_db": math.nan}
RANK_SHARE = 0.4  # advise ranks while this share of its time budget lasts (isolated sensitivity stops after it)


def _summary(m: OutputMetrics) -> dict[str, float]:
    return {"cosine": m.value("cosine"), "sqnr_db": m.value("sqnr")}


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and x == x else -math.inf


def _isolated(fm: Model, tm: TensorMap, nodes: list[str], ev: Evaluator, budget: int,
              progress: Progress | None, deadline: float = math.inf, first_deadline: float = math.inf
              ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Output metrics with only each of ``nodes`` in float, one session group at a time (none starts after
    ``deadline``, the first after ``first_deadline``); and the current model's (NaN if no group ran)."""
    base = copy.deepcopy(tm.qdq.proto)
    outputs = list(fm.output_names)
    variants = [float_node_variant(tm, n, f"f{i}") for i, n in enumerate(nodes)]
    groups = group_variants(base, variants, budget) if variants else [[]]
    out: dict[str, dict[str, float]] = {}
    current: dict[str, float] = dict(NAN)
    for k, g in enumerate(groups):
        if time.perf_counter() >= (deadline if k else first_deadline):
            break
        if progress:
            progress("advise: isolated sensitivity", k, len(groups))
        proto, where = build_multi(base, g, outputs)
        prune(proto, {t for w in where.values() for t in w.values()})
        metrics, _ = ev.evaluate([Session(proto, where)], stage="advise: isolated sensitivity")
        current = _summary(metrics["base"])
        for v in g:
            out[nodes[int(v.name[1:])]] = _summary(metrics[v.name])
    if progress:
        progress("advise: isolated sensitivity", len(groups), len(groups))
    return out, current


def rank_nodes(fm: Model, tm: TensorMap, source, *, samples: int = 32, shortlist: int = 24, batch_size: int = 16,
               optimization: str = "disable", providers: Sequence[str] | None = None,
               nodes_per_session: int | None = None, progress: Progress | None = None,
               deadline: float = math.inf, first_deadline: float = math.inf) -> Sensitivity:
    """Rank ``tm``'s quantized nodes (see the module docstring) on the first ``samples`` samples of ``source``;
    no isolated-sensitivity group starts after ``deadline`` (``time.perf_counter()`` seconds), the first one
    after ``first_deadline``."""
    t0 = time.perf_counter()
    lm = local_errors(fm, tm, source, batch_size=batch_size, limit=samples, optimization=optimization,
                      providers=providers, progress=progress)
    local = lm.by_node()
    nodes = list(tm.quantized)
    by_local = sorted(nodes, key=lambda n: (_num(local.get(n, NAN)["sqnr_db"]), n))
    short = by_local[:shortlist]
    ev = Evaluator(fm, source, batch_size=batch_size, optimization=optimization, providers=providers, limit=samples)
    budget = nodes_per_session or max(4 * len(tm.qdq.proto.graph.node), 64)
    iso, current = _isolated(fm, tm, short, ev, budget, progress, deadline, first_deadline)
    order = sorted(iso, key=lambda n: (-_num(iso[n]["sqnr_db"]), _num(local.get(n, NAN)["sqnr_db"])))
    order += [n for n in by_local if n not in iso]
    depth = fm.depth
    rows = [{"node": n, "rank": k + 1, "op_type": fm.nodes[n].op_type, "depth": depth[n],
             "quantized_inputs": [q.index for q in tm.quantized[n]], "local": local.get(n, dict(NAN)),
             "float_only": iso.get(n, dict(NAN)), "quant_only": dict(NAN)} for k, n in enumerate(order)]
    notes = [f"{n}: no local copy ({why})" for n, why in lm.skipped.items()]
    notes.append(f"ranked by local error; isolated sensitivity (float_only) measured for {len(iso)} of the "
                 f"{len(short)} nodes with the worst local SQNR" + ("" if len(iso) == len(short) else
                                                                  " (the time budget stopped the rest)")
                 + "; quant_only not measured")
    return Sensitivity(rows, current, {}, min(samples, len(source)), False, time.perf_counter() - t0, notes)
