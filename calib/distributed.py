"""Collection sharded over a Ray cluster (``backend="ray"``) or run here (``backend="local"``).

The data source is split into contiguous shards of sample indices in the source's own
(deterministic, sorted) order; shard k is named by its first and last sample id. Each shard is
a Ray task that opens the model and the data *itself* from the path or URI (``calib.data.uri``):
the driver only lists the samples, it never reads or ships them. Each task returns its
statistics as plain arrays; the driver merges them with ``ActivationStats.merge``, which is
exact, associative and commutative, so the result equals one local pass bit for bit.

Faults: a task whose worker process dies (killed, out of memory) is retried by Ray up to
``max_retries`` times. A shard that fails on bad input returns the ``CalibError`` message (which
names the sample) instead of raising in the worker; the driver raises ``InputDataError`` with it,
or, with ``skip_bad``, leaves the shard out and lists it. With ``skip_bad`` a sample that does not
fit the model (shape, dtype, NaN) is skipped and listed by id, in both backends alike.

Ray is an optional heavy dependency (the ``[ray]`` extra): it is imported inside the functions
that need it only.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from calib.collect import Progress, collect
from calib.collect_groups import default_max_memory, parse_bytes, rss_bytes
from calib.data.base import Sample, check_feeds
from calib.data.uri import open_data_uri
from calib.errors import CalibError, ConfigError, InputDataError
from calib.model import load_model
from calib.stats import ActivationStats

__all__ = ["BACKENDS", "ShardSpec", "ShardedResult", "plan_shards", "collect_shard", "collect_sharded",
           "resolve_max_memory"]

log = logging.getLogger(__name__)

BACKENDS = ("local", "ray")
AUTO_MAX_MEMORY = 2 << 30  # bytes: the cap of max_memory "auto" (see resolve_max_memory)


@dataclass(frozen=True)
class ShardSpec:
    """What one task needs: where model and data live, which samples, and the collection options."""

    index: int
    model: str
    data: str
    start: int
    stop: int
    batch_size: int = 8
    skip_bad: bool = False
    max_memory: int | None = None
    intra_op_threads: int | None = None
    fold_threads: int | None = None
    providers: tuple[str, ...] = ("cpu",)
    spec: str | None = None


@dataclass
class ShardedResult:
    stats: ActivationStats
    skipped: dict[str, str] = field(default_factory=dict)  # sample id (or shard) -> reason
    shard_seconds: list[float] = field(default_factory=list)  # wall time of each shard where it ran
    shard_cpu_seconds: list[float] = field(default_factory=list)  # CPU time (all threads) of each shard
    merge_seconds: float = 0.0


def resolve_max_memory(text: str | int | None, workers: int = 1) -> int | None:
    """``"2GB"`` -> bytes; ``"auto"`` -> half the memory available now, at most ``AUTO_MAX_MEMORY`` (2 GiB;
    or this process's RSS + 1 GiB if larger),
    split over ``workers`` on this machine; ``"none"``/None -> no bound. The cap keeps a whole run under
    4 GB: collecting every tensor of a 48x320 text recogniser at batch 8 in one pass peaks at 3.6 GB, in
    grouped passes (``calib.collect_groups``, the same statistics bit for bit) at 1.2 GB and no slower."""
    if text is None or str(text).strip().lower() in ("none", "0", ""):
        return None
    if str(text).strip().lower() == "auto":
        avail = default_max_memory(0.5)
        cap = max(AUTO_MAX_MEMORY, rss_bytes() + (1 << 30))  # a large model already resident still fits
        return min(avail, cap) // max(1, workers) if avail is not None else None
    return parse_bytes(str(text))


def plan_shards(n_samples: int, n_shards: int) -> list[tuple[int, int]]:
    """``n_shards`` contiguous, near-equal ``[start, stop)`` ranges covering ``0..n_samples`` (none empty)."""
    k = max(1, min(int(n_shards), n_samples))
    edges = [round(i * n_samples / k) for i in range(k + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


class _Checked:
    """The samples of ``source`` that fit the model; the others are recorded in ``skipped`` by id."""

    def __init__(self, source, inputs, skipped: dict[str, str]) -> None:
        self.source, self.inputs, self.skipped = source, inputs, skipped
        self.layout = getattr(source, "layout", "batch")

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self) -> Iterator[Sample]:
        for s in self.source:
            try:
                check_feeds(s, self.inputs, layout=self.layout)
            except InputDataError as e:
                self.skipped[s.id] = str(e)
                continue
            yield s


def collect_shard(shard: ShardSpec, progress: Progress | None = None) -> dict:
    """Collect one shard where it runs; returns plain data (stats arrays or the error), never raises CalibError."""
    t0, c0 = time.perf_counter(), time.process_time()
    skipped: dict[str, str] = {}
    try:
        model = load_model(shard.model)
        source = open_data_uri(shard.data, model, skip_bad=shard.skip_bad, spec=shard.spec)
        part = source.subset(range(shard.start, shard.stop))
        feed = _Checked(part, model.inputs, skipped) if shard.skip_bad else part
        stats = collect(model, feed, batch_size=shard.batch_size, providers=list(shard.providers),
                        intra_op_threads=shard.intra_op_threads, fold_threads=shard.fold_threads,
                        max_memory=shard.max_memory, progress=progress)
        skipped.update(getattr(part, "skipped", {}) or {})
        return {"index": shard.index, "arrays": stats.to_arrays(), "skipped": skipped, "error": None,
                "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
    except CalibError as e:
        return {"index": shard.index, "arrays": None, "skipped": skipped, "error": str(e), "hint": e.hint,
                "seconds": time.perf_counter() - t0}


def collect_sharded(model_path: str | os.PathLike, data_path: str | os.PathLike, *, backend: str = "local",
                    address: str | None = None, num_workers: int = 2, num_shards: int | None = None,
                    batch_size: int = 8, skip_bad: bool = False, max_memory: int | None = None,
                    max_retries: int = 3, threads_per_worker: int = 1, providers: Sequence[str] = ("cpu",),
                    spec: str | None = None, limit: int | None = None, progress: Progress | None = None,
                    task: Callable[[ShardSpec], dict] = collect_shard) -> ShardedResult:
    """Collect statistics of ``model_path`` over ``data_path`` (path or URI) on ``backend``.

    ``local``: one shard, run here (the embedded default; same numbers as ``calib.collect``).
    ``ray``: ``num_shards`` (default ``num_workers``) shards as Ray tasks of one CPU each, at most
    ``num_workers`` at a time, on the cluster at ``address`` (None: a local Ray started for this
    call). ``limit`` keeps the first samples only; ``progress`` is drawn for the local backend.
    ``task`` is what each shard runs (default ``collect_shard``).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend '{backend}' is not one of {list(BACKENDS)}")
    if num_workers < 1:
        raise ConfigError(f"num_workers must be >= 1, got {num_workers}")
    model_s, data_s = os.fspath(model_path), os.fspath(data_path)
    listing = open_data_uri(data_s, load_model(model_s), skip_bad=skip_bad, spec=spec)  # lists samples only
    n = len(listing) if limit is None else min(len(listing), limit)
    if n == 0:
        raise InputDataError(f"{data_s}: the calibration set is empty (no samples)")
    ranges = plan_shards(n, 1 if backend == "local" else (num_shards or num_workers))
    threads = None if backend == "local" else threads_per_worker
    shards = [ShardSpec(k, model_s, data_s, a, b, batch_size, skip_bad, max_memory, threads, 1 if threads else None,
                        tuple(providers), spec) for k, (a, b) in enumerate(ranges)]
    if backend == "local":
        results = [collect_shard(s, progress) if task is collect_shard else task(s) for s in shards]
    else:
        results = _run_on_ray(shards, task, address=address, num_workers=num_workers, max_retries=max_retries)
    out = _merge(results, shards, skip_bad)
    out.skipped = {**(getattr(listing, "skipped", {}) or {}), **out.skipped}  # files missing at listing time
    return out


def _run_on_ray(shards: list[ShardSpec], task: Callable[[ShardSpec], dict], *, address: str | None,
                num_workers: int, max_retries: int) -> list[dict]:
    import ray  # optional heavy dependency ([ray] extra): imported only when the ray backend is used

    owned = not ray.is_initialized()
    if owned:
        ray.init(address=address, num_cpus=None if address else num_workers, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    try:
        remote = ray.remote(num_cpus=1, max_retries=max_retries, retry_exceptions=False)(task)
        waiting, running, done = list(shards), [], []
        while waiting or running:
            while waiting and len(running) < num_workers:
                running.append(remote.remote(waiting.pop(0)))
            ready, running = ray.wait(running, num_returns=1)
            done += ray.get(ready)
        return sorted(done, key=lambda r: r["index"])
    except ray.exceptions.RayError as e:
        raise InputDataError(f"a collection task failed on Ray after {max_retries} retries: "
                             f"{str(e).splitlines()[0]}", hint="see the Ray logs of the failed worker") from None
    finally:
        if owned:
            ray.shutdown()


def _merge(results: list[dict], shards: list[ShardSpec], skip_bad: bool) -> ShardedResult:
    out = ShardedResult(stats=None)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    merged: ActivationStats | None = None
    for r, s in zip(results, shards):
        out.shard_seconds.append(float(r["seconds"]))
        out.shard_cpu_seconds.append(float(r.get("cpu_seconds", 0.0)))
        out.skipped.update(r["skipped"])
        if r["error"] is not None:
            where = f"shard {s.index} (samples {s.start}..{s.stop - 1})"
            if not skip_bad:
                raise InputDataError(f"{where}: {r['error']}", hint=r.get("hint"))
            log.warning("leaving out %s: %s", where, r["error"])
            out.skipped[where] = r["error"]
            continue
        part = ActivationStats.from_arrays(r["arrays"], source=f"shard {s.index}")
        merged = part if merged is None else merged.merge(part)
    if merged is None:
        raise InputDataError("every shard failed; no statistics", hint="see the skipped samples listed")
    out.stats, out.merge_seconds = merged, time.perf_counter() - t0
    return out
