"""Evaluate many INT8 variants against FP32 outputs on one evaluation set, batch by batch.

``Evaluator`` keeps the FP32 reference outputs of the evaluation set once they
are computed (when they fit ``cache_bytes``; otherwise the FP32 model runs again
each pass), so every later pass runs only the variant sessions. Each pass runs
several sessions (``build_multi`` models, several variants each) on the same
batch and folds every variant's outputs into its own ``OutputMetrics``. A
``stop(metrics, n_samples)`` callback can end a pass early.

Within ``sharing_references(refs)`` (a run of the pipeline) every ``Evaluator`` on the same FP32 model,
samples and settings reads one copy of the reference outputs (``References``), and within ``recording(pace)``
each local pass reports its work (graph nodes x samples) and seconds (``pace.add``; the run's time budget,
``calib.pipeline.budget``).

Where the passes run: here, unless an evaluation backend is active (``using_backend``, e.g.
``calib.compare.ray_eval.RayEvaluation``), which then runs ``evaluate`` with the same meaning:
the same metrics bit for bit (exact sums, ``calib.compare.metrics``) and the same early stop.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx

from calib.compare.targets import OutputMetrics, UserMetric
from calib.model import Model
from calib.runtime import open_runner, run_batches

__all__ = ["Session", "Evaluator", "using_backend", "current_backend", "metric_keys", "References",
           "sharing_references", "recording"]

log = logging.getLogger(__name__)
Progress = Callable[[str, int, "int | None"], None]


_BACKEND: contextvars.ContextVar = contextvars.ContextVar("calib_evaluation_backend", default=None)
_REFS: contextvars.ContextVar = contextvars.ContextVar("calib_fp32_references", default=None)
_PACE: contextvars.ContextVar = contextvars.ContextVar("calib_evaluation_pace", default=None)


class References:
    """FP32 reference outputs shared by the evaluators of one run, at most ``max_bytes`` in all.

    An entry is keyed by the identity of the FP32 proto and the source (both held, so the ids stay theirs)
    and by the samples, batch size, optimisation and providers: the same batches, the same values."""

    def __init__(self, max_bytes: int = 384 << 20) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._entries: dict[tuple, tuple[object, object, list[dict[str, np.ndarray]]]] = {}

    @staticmethod
    def key(ev: "Evaluator") -> tuple:
        return (id(ev.fp32.proto), id(ev.source), ev.n_samples, ev.batch_size, ev.optimization,
                tuple(ev.providers or ()))

    def get(self, ev: "Evaluator") -> list[dict[str, np.ndarray]] | None:
        hit = self._entries.get(self.key(ev))
        if hit is None or hit[0] is not ev.fp32.proto or hit[1] is not ev.source:
            return None
        return hit[2]

    def put(self, ev: "Evaluator", outputs: list[dict[str, np.ndarray]]) -> None:
        size = sum(v.nbytes for b in outputs for v in b.values())
        if self.key(ev) in self._entries or self.used + size > self.max_bytes:
            return
        self._entries[self.key(ev)] = (ev.fp32.proto, ev.source, outputs)
        self.used += size


@contextlib.contextmanager
def sharing_references(refs: References | None):
    """Every ``Evaluator`` inside the block reads and fills ``refs`` (None: each keeps its own)."""
    token = _REFS.set(refs)
    try:
        yield refs
    finally:
        _REFS.reset(token)


@contextlib.contextmanager
def recording(pace):
    """Every local evaluation pass inside the block calls ``pace.add(node_samples, seconds)``."""
    token = _PACE.set(pace)
    try:
        yield pace
    finally:
        _PACE.reset(token)


def current_backend():
    """The evaluation backend of the enclosing ``using_backend`` block, or None (run here)."""
    return _BACKEND.get()


@contextlib.contextmanager
def using_backend(backend):
    """Run every ``Evaluator.evaluate`` inside the block on ``backend`` (an object with the same ``evaluate``
    signature plus the evaluator as first argument); None: here."""
    token = _BACKEND.set(backend)
    try:
        yield backend
    finally:
        _BACKEND.reset(token)


def metric_keys(sessions: Sequence["Session"]) -> list[tuple[int, str, str]]:
    """(session index, variant, metrics key) of every variant; a "base" variant past the first session is
    keyed ``base<i>``."""
    return [(si, v, v if v != "base" else ("base" if si == 0 else f"base{si}"))
            for si, s in enumerate(sessions) for v in s.where]


@dataclass
class Session:
    """A model to run and, per variant name, which of its tensors hold each graph output."""

    proto: onnx.ModelProto
    where: dict[str, dict[str, str]]


class Evaluator:
    def __init__(self, fp32: Model, source, *, batch_size: int = 16, labels: Sequence[int] | None = None,
                 user: UserMetric | None = None, optimization: str = "disable",
                 providers: Sequence[str] | None = None, limit: int | None = None,
                 cache_bytes: int = 256 << 20) -> None:
        self.fp32 = fp32
        self.source = source
        self.batch_size = batch_size
        self.labels = labels
        self.user = user
        self.optimization = optimization
        self.providers = providers
        self.limit = limit
        self.cache_bytes = cache_bytes
        self.outputs = list(fp32.output_names)
        self._cache: list[dict[str, np.ndarray]] | None = None
        self.n_samples = min(len(source), limit) if limit is not None else len(source)

    def evaluate(self, sessions: Sequence[Session], *, stage: str = "evaluate", progress: Progress | None = None,
                 stop: Callable[[dict[str, OutputMetrics], int], bool] | None = None
                 ) -> tuple[dict[str, OutputMetrics], int]:
        """Metrics per variant name over the evaluation set (or until ``stop`` says so); also samples used."""
        backend = _BACKEND.get()
        if backend is not None:
            return backend.evaluate(self, sessions, stage=stage, progress=progress, stop=stop)
        metrics: dict[str, OutputMetrics] = {}
        for _si, _v, key in metric_keys(sessions):
            metrics.setdefault(key, OutputMetrics(self.outputs, self.user))
        refs = _REFS.get()
        if self._cache is None and refs is not None:
            self._cache = refs.get(self)
        use_cache = self._cache is not None
        store: list[dict[str, np.ndarray]] | None = [] if self._cache is None else None
        t0 = time.perf_counter()
        stored = 0
        done = 0
        with contextlib.ExitStack() as stack:
            runners = []
            for i, s in enumerate(sessions):
                outs = sorted({t for w in s.where.values() for t in w.values()})
                runners.append(stack.enter_context(open_runner(
                    s.proto, outs, optimization=self.optimization, providers=self.providers, name=f"variants {i}")))
            if not use_cache:
                runners.insert(0, stack.enter_context(open_runner(
                    self.fp32.proto, self.outputs, optimization=self.optimization, providers=self.providers,
                    name="FP32 model")))
            if progress:
                progress(stage, 0, self.n_samples)
            for b, (ids, labs, outs) in enumerate(run_batches(self.source, self.fp32, self.batch_size, runners,
                                                             self.labels, self.limit)):
                if use_cache:
                    ref = self._cache[b]
                else:
                    ref, outs = outs[0], outs[1:]
                    if store is not None:
                        stored += sum(v.nbytes for v in ref.values())
                        if stored <= max(self.cache_bytes, refs.max_bytes if refs is not None else 0):
                            store.append({k: ref[k] for k in self.outputs})
                        else:
                            store = None
                for si, v, key in metric_keys(sessions):
                    metrics[key].update(ref, {o: outs[si][t] for o, t in sessions[si].where[v].items()}, ids, labs)
                del outs, ref
                done += len(ids) if ids is not None else 1
                if progress:
                    progress(stage, done, self.n_samples)
                if stop is not None and stop(metrics, done):
                    store = None  # a partial pass cannot fill the cache
                    break
        if store is not None and not use_cache:
            if stored <= self.cache_bytes:
                self._cache = store
            if refs is not None:
                refs.put(self, store)
        self._record_pace(sessions, use_cache, done, time.perf_counter() - t0)
        return metrics, done

    def _record_pace(self, sessions: Sequence[Session], cached: bool, done: int, seconds: float) -> None:
        """Tell the active pace (``recording``) the pass's work, graph nodes x samples, and its seconds."""
        if (pace := _PACE.get()) is not None:
            nodes = sum(len(s.proto.graph.node) for s in sessions) + (0 if cached else len(self.fp32.proto.graph.node))
            pace.add(nodes * done, seconds)

    def score(self, models: dict[str, onnx.ModelProto], *, stage: str = "scoring",
              progress: Progress | None = None) -> dict[str, OutputMetrics]:
        """Output metrics of each whole model (label -> proto) in one pass beside FP32."""
        sessions = [Session(proto, {label: {o: o for o in self.outputs}}) for label, proto in models.items()]
        metrics, _ = self.evaluate(sessions, stage=stage, progress=progress)
        return {label: metrics[label] for label in models}
