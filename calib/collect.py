"""Collection: stream samples through the FP32 model on ONNX Runtime into ``ActivationStats``.

The needed intermediate tensors are exposed as outputs on a *copy* of the
model. While ONNX Runtime runs batch k+1, worker threads fold batch k into the
histograms (compiled, GIL-free), so both cores work and at most two batches of
activations are alive at once: memory does not grow with the number of samples.

Thread split (measured on a 2-core machine, bench/results/collect.md): ONNX Runtime
gets ``cpu_count - fold_threads`` intra-op threads with spinning off, and
``fold_threads = max(1, cpu_count // 4)`` threads fold. ONNX Runtime's parallel
sections wait for their slowest thread, so letting its spinning threads share a core
with the fold thread made collection 1.7-2x slower than a plain ORT pass; with the
split it is within ~1.15x.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from calib import collect_groups as groups_mod
from calib.data.base import Sample, batches, limited
from calib.errors import InputDataError, ModelError
from calib.model import Model, load_model
from calib.model_guard import refuse_quantized
from calib.runtime import expose_outputs, make_session, resolve_providers
from calib.stats import ActivationStats, TensorHistogram

__all__ = ["collect", "make_session", "expose_outputs", "resolve_providers"]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, "int | None"], None]


def fold_thread_split(intra_op_threads: int | None = None, fold_threads: int | None = None) -> tuple[int, int]:
    """(ONNX Runtime intra-op threads, fold threads) for this machine (see the module doc)."""
    cpus = os.cpu_count() or 1
    folds = fold_threads or max(1, cpus // 4)
    return intra_op_threads or max(1, cpus - folds), folds


def collect(model: Model | str | os.PathLike, source: Iterable[Sample], *, tensors: Sequence[str] | None = None,
            batch_size: int = 8, providers: Sequence[str] | None = None, limit: int | None = None,
            intra_op_threads: int | None = None, fold_threads: int | None = None,
            progress: Progress | None = None, max_memory: int | None = None) -> ActivationStats:
    """Collect exact, mergeable statistics of ``tensors`` (default: every quantizable activation).

    ``source`` yields ``Sample`` objects (``calib.data``); its ``layout`` attribute
    ("batch" or "feed") says whether samples are stacked into batches. ``max_memory``
    (bytes) exposes the tensors in groups that fit, one pass over the data per group
    (``calib.collect_groups``); the statistics are the same bit for bit.
    """
    if not isinstance(model, Model):
        model = load_model(model)
    refuse_quantized(model)
    names = list(model.activation_tensors() if tensors is None else tensors)
    known = set(model.producers) | {s.name for s in model.inputs}
    unknown = [t for t in names if t not in known]
    if unknown:
        raise ModelError(f"tensor '{unknown[0]}' is not produced by the model", hint="check the tensor name")
    layout = getattr(source, "layout", "batch")
    total = len(source) if hasattr(source, "__len__") else None
    if limit is not None:
        total = min(total, limit) if total is not None else limit
    ort_threads, fold_threads = fold_thread_split(intra_op_threads, fold_threads)
    fetch = [t for t in names if t not in {s.name for s in model.inputs}]
    groups, batch_size, optimized = _plan(model, source, fetch, layout, batch_size, max_memory, providers)
    exposed = expose_outputs(model.proto, fetch) if optimized is None else None
    arena = max_memory is None  # with a bound, freed tensors go back to the system
    hists = {t: TensorHistogram() for t in names}
    stats = ActivationStats(hists, model.sha256, meta={"inputs": [s.name for s in model.inputs], "shapes": {},
                                                       "dtypes": {}, "skipped": {}, "layout": layout})
    t0 = time.perf_counter()
    for k, group in enumerate(groups):
        sess = (make_session(exposed, providers, intra_op_threads=ort_threads, spinning=False, arena=arena)
                if optimized is None else
                make_session(groups_mod.group_proto(optimized, group), providers, intra_op_threads=ort_threads,
                             spinning=False, optimization="disable", arena=arena))
        done = _one_pass(model, sess, group, limited(source, limit), stats, layout, batch_size, fold_threads,
                         first=k == 0, progress=progress, total=total,
                         stage="collect" if k == 0 else f"collect (pass {k + 1}/{len(groups)})")
        del sess
    if done == 0:
        raise InputDataError("the calibration set is empty (no samples)", hint="point --data at a non-empty set")
    for t in list(stats.meta["skipped"]):
        hists.pop(t, None)
    # one line per call: a debug detail for one pass (a run collects shard by shard), news under --max-memory
    log.log(logging.INFO if len(groups) > 1 else logging.DEBUG, "collected %d tensors over %d samples in %d "
            "pass(es) in %.1fs", len(hists), done, len(groups), time.perf_counter() - t0)
    return stats


def _plan(model: Model, source: Iterable[Sample], fetch: list[str], layout: str, batch_size: int,
          max_memory: int | None, providers: Sequence[str] | None
          ) -> tuple[list[list[str]], int, "onnx.ModelProto | None"]:
    """(tensor groups, batch size, optimised model or None): one pass unless ``max_memory`` asks for several.

    A one-pass plan is first checked with the model's own shapes (cheap); if it does not fit, ONNX Runtime's
    optimised graph is sized on the first sample and packed into groups (``calib.collect_groups``).
    """
    if max_memory is None or not fetch:
        return [fetch], batch_size, None
    first = next(iter(source), None)
    if first is None:
        return [fetch], batch_size, None
    if iter(source) is source:
        raise InputDataError("collection in memory-bounded groups reads the data several times; this source "
                             "can be read only once", hint="pass a Source (calib.data) or drop max_memory")
    quick, est = quick_plan(model, first, fetch, layout, batch_size, max_memory)
    if quick.peak(fetch) <= max_memory:
        log.info("max_memory %d MiB: 1 tensor group(s), batch %d", max_memory >> 20, quick.batch_size)
        return [fetch], quick.batch_size, None
    plan, optimized, set_batch = measured_plan(model, first, fetch, layout, quick, est, providers)
    plan = groups_mod.fit(plan, fetch, plan.batch_size, set_batch)
    log.info("max_memory %d MiB: %d tensor group(s), batch %d; %s", max_memory >> 20, len(plan.groups),
             plan.batch_size, plan.describe())
    return plan.groups, plan.batch_size, optimized


def _first_feeds(model: Model, first: Sample, layout: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    dtypes = {s.name: s.dtype for s in model.inputs}
    one = {k: np.asarray(v, dtype=dtypes.get(k)) for k, v in first.feeds.items()}
    return one, (one if layout == "feed" else {k: v[None] for k, v in one.items()})


def quick_plan(model: Model, first: Sample, fetch: list[str], layout: str, batch_size: int,
               max_memory: int) -> tuple[groups_mod.MemoryPlan, dict[str, int]]:
    """(one pass over every tensor in ``fetch`` costed with the model's own shapes, the estimated bytes per sample
    of every node output): ONNX shape inference on ``first``; the batch size is the pass's (a fixed batch
    dimension or the feed layout wins over ``batch_size``)."""
    one, _ = _first_feeds(model, first, layout)
    fixed = {s.shape[0] for s in model.inputs if s.shape and s.shape[0] is not None}
    b = 1 if layout == "feed" else (next(iter(fixed)) if len(fixed) == 1 else batch_size)
    nodes = [o for n in model.proto.graph.node for o in n.output if o]
    known = groups_mod.inferred_shapes(model, {k: v.shape for k, v in one.items()}, layout)
    est = groups_mod.padded_bytes(known, nodes)
    padded = groups_mod.padded_bytes(known, nodes, groups_mod.CHANNEL_BLOCK)  # ONNX Runtime's blocked layouts
    _warm_fold()  # the fold kernels' code (numba) and ONNX Runtime's first session are part of the baseline
    base = groups_mod.rss_bytes() or 0
    in_bytes = sum(int(v.nbytes) for v in one.values())
    return groups_mod.MemoryPlan(max_memory, b, [fetch], base, groups_mod.SESSION_COPIES * model.proto.ByteSize(),
                                 2 * groups_mod.working_bytes(model.proto, padded), in_bytes,
                                 {t: est[t] for t in fetch}, _stats_bytes(model, fetch)), est


def measured_plan(model: Model, first: Sample, fetch: list[str], layout: str, quick: groups_mod.MemoryPlan,
                  est: dict[str, int], providers: Sequence[str] | None
                  ) -> tuple[groups_mod.MemoryPlan, onnx.ModelProto, bool]:
    """(the plan with ONNX Runtime's optimised graph sized on ``first``, that graph, whether the batch size is
    fixed): groups not yet filled (``collect_groups.fit``)."""
    _, feeds = _first_feeds(model, first, layout)
    fixed = {s.shape[0] for s in model.inputs if s.shape and s.shape[0] is not None}
    set_batch = layout == "feed" or len(fixed) == 1  # batches() cannot change these batch sizes
    optimized = groups_mod.optimized_exposed(expose_outputs(model.proto, fetch), resolve_providers(providers))
    guess = max(est.values(), default=4)
    names = {o: est.get(o, guess) for n in optimized.graph.node for o in n.output if o}
    sizes = groups_mod.measured_sizes(optimized, feeds, resolve_providers(providers), names,
                                      (quick.max_memory - quick.baseline) // 3)
    gc.collect()
    plan = groups_mod.MemoryPlan(quick.max_memory, quick.batch_size, [], groups_mod.rss_bytes() or 0,
                                 groups_mod.SESSION_COPIES * optimized.ByteSize(),
                                 groups_mod.working_bytes(optimized, sizes), quick.inputs, {t: sizes[t] for t in fetch},
                                 quick.stats)
    return plan, optimized, set_batch


def _stats_bytes(model: Model, fetch: list[str]) -> int:
    return (len(fetch) + len(model.inputs)) * groups_mod.HIST_BYTES


def _warm_fold() -> None:
    """Load the compiled fold kernels (finite and non-finite paths) and ONNX Runtime's CPU provider (its first
    session's one-time cost) so the memory they take is measured."""
    x = np.ones(4, np.float32)
    TensorHistogram().update(x)
    x[0] = np.nan
    TensorHistogram().update(x)
    g = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "warm",
                               [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])])
    sess = make_session(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)]), None,
                        intra_op_threads=1, spinning=False, arena=False)
    sess.run(None, {"x": x})


def _one_pass(model: Model, sess: ort.InferenceSession, fetch: list[str], source: Iterable[Sample],
              stats: ActivationStats, layout: str, batch_size: int, fold_threads: int, *, first: bool,
              progress: Progress | None, total: int | None, stage: str = "collect") -> int:
    """Run the data through ``sess`` once, folding ``fetch`` (and, on the first pass, inputs and sample ids)."""
    hists = stats.tensors
    done = 0
    if progress:
        progress(stage, 0, total)
    pending: list[Future] = []
    with ThreadPoolExecutor(max_workers=fold_threads, thread_name_prefix="calib-fold") as pool:
        for ids, feeds, _labels in batches(source, model.inputs, batch_size, layout=layout):
            try:
                outs = sess.run(fetch, feeds)
            except Exception as e:
                raise InputDataError(f"samples {ids[0]}..{ids[-1]}: ONNX Runtime failed: {str(e).splitlines()[0]}",
                                     hint="check the data against the model's inputs") from None
            values = dict(zip(fetch, outs))
            for s in model.inputs:
                if first and s.name in hists:
                    values[s.name] = feeds[s.name]
            for f in pending:
                f.result()
            pending = [pool.submit(_fold_batch, stats, part, layout) for part in _split(values, fold_threads)]
            if first:
                stats.add_samples(ids)
            done += len(ids)
            if progress:
                progress(stage, done, total)
        for f in pending:
            f.result()
    return done


def _split(values: dict[str, np.ndarray], parts: int) -> list[dict[str, np.ndarray]]:
    """Split tensors into ``parts`` groups of about equal size (largest first, to the lightest group)."""
    if parts <= 1:
        return [values]
    groups: list[dict[str, np.ndarray]] = [{} for _ in range(parts)]
    load = [0] * parts
    for name in sorted(values, key=lambda k: -values[k].size):
        i = load.index(min(load))
        groups[i][name] = values[name]
        load[i] += values[name].size
    return [g for g in groups if g]


def _fold_batch(stats: ActivationStats, values: dict[str, np.ndarray], layout: str) -> None:
    meta = stats.meta
    for name, x in values.items():
        h = stats.tensors.get(name)
        if h is None:
            continue
        if x.dtype.kind != "f":
            meta["skipped"][name] = f"dtype {x.dtype} (not float)"
            continue
        if name not in meta["shapes"]:
            meta["shapes"][name] = list(x.shape[1:] if layout == "batch" else x.shape)
            meta["dtypes"][name] = str(x.dtype)
        h.update(x)
