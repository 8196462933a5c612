"""Compare, the evaluator, sensitivity and advise on a Ray cluster: batches of samples scored by Ray actors.

``RayEvaluation`` is an evaluation backend (``calib.compare.evaluate.using_backend``): inside
``with RayEvaluation(num_workers=2):`` every ``Evaluator.evaluate`` (compare's scoring, ``auto``,
sensitivity, advise's candidate steps) runs on Ray instead of here, with the same results:

* The evaluation set is cut into the batches a local pass makes (same size, same order); batch b
  goes to actor ``b % num_workers``. An actor opens the FP32 model and the data *itself* (the source
  is pickled by reference: a path and sample indices, never the samples), keeps the FP32 outputs of
  its batches (its share of the cache), and scores every variant of the call on each batch it gets.
* The driver folds the per-batch metrics in batch order and asks ``stop`` after each batch, as the
  local loop does; the metrics are exact sums (``calib.compare.metrics``), so the merged metrics,
  the early stop, and hence every choice made from them (sensitivity's ranking, advise's float
  nodes and methods) equal the local run's bit for bit. A stopped pass discards the batches already
  sent past the stop (at most two per actor).
* Compare's layer-by-layer pass (``layer_pass``) runs in shards of consecutive whole batches, one Ray task
  each, merged in sample order (``calib.compare.layer_pass``: exact sums, the first lowest cosine), so the
  per-layer, local-error and output metrics equal the local pass's bit for bit.
* A worker process that dies is restarted by Ray and its pending batches retried (``max_retries``);
  the restarted actor rebuilds its sessions and FP32 outputs, so the result is unchanged.

Ray is the optional ``[ray]`` extra, imported only here.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import weakref
from typing import Any, Callable, Sequence

import numpy as np

from calib.compare.evaluate import Evaluator, Session, metric_keys, using_backend
from calib.compare.targets import OutputMetrics
from calib.compare.layer_pass import LayerJob, LayerPass, batch_starts, run_layer_pass
from calib.errors import ConfigError, InputDataError, ModelError
from calib.model import model_from_proto
from calib.runtime import Runner, make_session, mark_outputs, run_batches

__all__ = ["RayEvaluation", "batch_ranges"]

log = logging.getLogger(__name__)


def batch_ranges(ev: Evaluator) -> list[tuple[int, int]]:
    """The ``[start, stop)`` sample ranges of the batches a local pass of ``ev`` runs (``calib.data.batches``)."""
    layout = getattr(ev.source, "layout", "batch")
    fixed = {s.shape[0] for s in ev.fp32.inputs if s.shape and s.shape[0] is not None}
    step = 1 if layout == "feed" else (fixed.pop() if len(fixed) == 1 else ev.batch_size)
    return [(a, min(a + step, ev.n_samples)) for a in range(0, ev.n_samples, step)]


class _Shard:
    """What one worker keeps for one evaluator: the FP32 model and session, the data, its FP32 outputs."""

    def __init__(self, fp32_proto, source, outputs: list[str], labels, user, optimization: str, providers,
                 cache_bytes: int) -> None:
        self.fp32 = model_from_proto(fp32_proto)
        self.source, self.outputs, self.labels, self.user = source, outputs, labels, user
        self.optimization, self.providers, self.cache_bytes = optimization, providers, cache_bytes
        self.ref: dict[int, dict[str, np.ndarray]] = {}
        self.cached = 0
        self.runner = _runner(self.fp32.proto, outputs, optimization, providers)


def _runner(proto, outputs: Sequence[str], optimization: str, providers) -> Runner:
    sess = make_session(mark_outputs(proto, outputs), providers, intra_op_threads=1, inter_op_threads=1,
                        optimization=optimization, name="variants")
    return Runner(sess, list(outputs))


class _Worker:
    """One Ray actor (one CPU): per evaluator a ``_Shard``; per call the variant sessions; scores batch by batch.

    Everything a task needs comes with it (object references), so an actor Ray restarted rebuilds its state
    on the first task it gets.
    """

    def __init__(self) -> None:
        self.shards: dict[int, _Shard] = {}
        self.call: tuple[int, list[Runner]] | None = None

    def pid(self) -> int:
        return os.getpid()

    def forget(self, key: int) -> None:
        self.shards.pop(key, None)

    def layer(self, job: LayerJob, source, start: int, stop: int, labels) -> LayerPass:
        """Compare's pass over samples ``start..stop-1``, read here from ``source`` (one ONNX Runtime thread)."""
        return run_layer_pass(job, model_from_proto(job.fp32_proto), source.subset(range(start, stop)),
                              labels=labels, threads=1)

    def run(self, key: int, setup: tuple, call: int, sessions: list[tuple[Any, dict]], b: int, start: int,
            stop: int) -> tuple[dict[str, OutputMetrics], int]:
        """Metrics of every variant on batch ``b`` (samples ``start..stop-1``) alone, and its sample count."""
        sh = self.shards.get(key) or self.shards.setdefault(key, _Shard(*setup))
        if self.call is None or self.call[0] != call:
            self.call = None  # the previous call's sessions go before this call's are built
            self.call = (call, [_runner(p, sorted({t for w in where.values() for t in w.values()}), sh.optimization,
                                        sh.providers) for p, where in sessions])
        have = b in sh.ref
        labels = None if sh.labels is None else list(sh.labels[start:stop])
        wheres = [Session(p, w) for p, w in sessions]
        out = {k: OutputMetrics(sh.outputs, sh.user) for _, _, k in metric_keys(wheres)}
        n = 0
        for ids, labs, outs in run_batches(sh.source.subset(range(start, stop)), sh.fp32, stop - start,
                                           self.call[1] if have else [sh.runner, *self.call[1]], labels):
            ref = sh.ref[b] if have else outs[0]
            outs = outs if have else outs[1:]
            size = sum(v.nbytes for v in ref.values())
            if not have and sh.cached + size <= sh.cache_bytes:
                sh.ref[b], sh.cached = {k: ref[k] for k in sh.outputs}, sh.cached + size
            for si, v, k in metric_keys(wheres):
                out[k].update(ref, {o: outs[si][t] for o, t in sessions[si][1][v].items()}, ids, labs)
            n += len(ids) if ids is not None else 1
        return out, n


class RayEvaluation:
    """An evaluation backend on Ray (module doc). Use as a context manager; starts a local Ray (``num_workers``
    CPUs) unless one is running or ``address`` names a cluster."""

    def __init__(self, num_workers: int = 2, *, address: str | None = None, max_retries: int = 3,
                 runtime_env: dict | None = None) -> None:
        if num_workers < 1:
            raise ConfigError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers, self.address, self.max_retries, self.runtime_env = num_workers, address, max_retries, runtime_env
        self._setups: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # evaluator -> (key, setup ref)
        self._pool: list = []
        self._finalizers: list = []
        self._calls = itertools.count()
        self._owned = False
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "RayEvaluation":
        import ray  # optional heavy dependency ([ray] extra)

        if not ray.is_initialized():
            ray.init(address=self.address, num_cpus=None if self.address else self.num_workers,
                     include_dashboard=False, log_to_driver=False, configure_logging=False,
                     runtime_env=self.runtime_env)
            self._owned = True
        self._stack.enter_context(using_backend(self))
        return self

    def __exit__(self, *exc) -> None:
        import ray

        self._stack.close()
        for f in self._finalizers:
            f.detach()
        for w in self._pool:
            ray.kill(w)
        self._pool, self._setups = [], weakref.WeakKeyDictionary()
        if self._owned:
            ray.shutdown()

    def workers(self) -> list:
        """The actors (created on first use, one CPU each, restarted by Ray if their process dies)."""
        if not self._pool:
            import ray

            actor = ray.remote(num_cpus=1, max_restarts=self.max_retries, max_task_retries=self.max_retries)(_Worker)
            self._pool = [actor.remote() for _ in range(self.num_workers)]
        return self._pool

    def _setup(self, ev: Evaluator) -> tuple[int, Any]:
        """(key, object reference of what a worker needs to score for ``ev``); the workers keep it per key."""
        if ev not in self._setups:
            import ray

            key = next(self._calls)
            setup = ray.put((ev.fp32.proto, ev.source, ev.outputs, None if ev.labels is None else list(ev.labels),
                             ev.user, ev.optimization, ev.providers, ev.cache_bytes // self.num_workers))
            self._setups[ev] = (key, setup)
            self._finalizers.append(weakref.finalize(ev, self._forget, key))
        return self._setups[ev]

    def _forget(self, key: int) -> None:
        for w in self._pool:
            with contextlib.suppress(Exception):
                w.forget.remote(key)

    def evaluate(self, ev: Evaluator, sessions: Sequence[Session], *, stage: str = "evaluate",
                 progress: Callable | None = None, stop: Callable | None = None
                 ) -> tuple[dict[str, OutputMetrics], int]:
        """``Evaluator.evaluate`` on the actors: batches in local order, folded and stopped as locally."""
        import ray

        workers, ranges = self.workers(), batch_ranges(ev)
        (key, setup), call = self._setup(ev), next(self._calls)
        ref = ray.put([(s.proto, s.where) for s in sessions])
        metrics = {k: OutputMetrics(ev.outputs, ev.user) for _, _, k in metric_keys(sessions)}
        pending: collections.deque = collections.deque()
        queued = iter(enumerate(ranges))

        def submit() -> None:
            nxt = next(queued, None)
            if nxt is not None:
                b, (a, z) = nxt
                pending.append(workers[b % len(workers)].run.remote(key, setup, call, ref, b, a, z))

        for _ in range(2 * len(workers)):
            submit()
        done = 0
        if progress:
            progress(stage, 0, ev.n_samples)
        while pending:
            part, n = self._get(pending.popleft())
            submit()
            metrics = {k: m.merge(part[k]) for k, m in metrics.items()}
            done += n
            if progress:
                progress(stage, done, ev.n_samples)
            if stop is not None and stop(metrics, done):
                break
        for p in pending:  # batches sent past the stop: not counted
            with contextlib.suppress(Exception):
                ray.cancel(p)
        return metrics, done

    def layer_pass(self, job: LayerJob, model, source, *, labels=None, limit: int | None = None,
                   progress: Callable | None = None) -> LayerPass:
        """Compare's pass (``calib.compare.layer_pass``) in shards of whole batches, consecutive sample ranges
        run by the actors (shard i on actor i mod workers), merged in sample order: the local pass's
        accumulators bit for bit."""
        import ray

        workers = self.workers()
        n = min(len(source), limit) if limit is not None else len(source)
        starts = batch_starts(model, source, job.batch_size, n)
        k = max(1, min(len(starts), 2 * self.num_workers))
        cuts = [starts[round(i * len(starts) / k)] for i in range(k)] + [n]
        job_ref, src_ref = ray.put(job), ray.put(source)
        refs = [workers[i % len(workers)].layer.remote(job_ref, src_ref, a, z, None if labels is None else
                                                       list(labels[a:z]))
                for i, (a, z) in enumerate((a, z) for a, z in zip(cuts, cuts[1:]) if z > a)]
        merged: LayerPass | None = None
        for r in refs:  # in sample order
            part = self._get(r)
            merged = part if merged is None else merged.merge(part)
            if progress:
                progress("compare", merged.n, n)
        return merged

    def _get(self, ref):
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause()
            if isinstance(cause, (InputDataError, ConfigError, ModelError)):
                raise cause from None
            raise
        except ray.exceptions.RayError as e:
            raise InputDataError(f"an evaluation worker failed on Ray after {self.max_retries} retries: "
                                 f"{str(e).splitlines()[0]}", hint="see the Ray logs of the failed worker") from None
