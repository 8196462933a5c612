"""Re-calibrate in seconds: a run keeps its statistics per shard of samples.

``collect_into_run`` collects the calibration set shard by shard (``SHARD_SIZE`` samples each, in
the source's order) and writes each shard's ``ActivationStats`` under ``<run>/shards/`` plus
``shards.json`` (the sample ids of each shard). The run's ``stats.npz`` is their merge:
``ActivationStats.merge`` is exact, associative and commutative, so the total equals one pass.

``recalibrate`` makes a new run without some samples: the shards that held none of them are
reused as they are, only the touched shards are collected again on their remaining samples, the
total is their merge, and the ranges, the Q/DQ model (with the old run's float nodes and per-tensor
methods), the TensorRT cache and the scale report are exported again. No compare and no new advise
("ranges only"); a full re-run is ``calib.pipeline.execute`` with ``calib_ids``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from calib.calibrate import Ranges, calibrate_all, parse_method, save_ranges, weight_ranges
from calib.collect import collect
from calib.data.preprocess import PreprocessSpec, stamp_model
from calib.data.sampling import pool_ids
from calib.errors import InputDataError, RunStoreError
from calib.export import export_qdq, scale_report, write_cache, write_scale_report
from calib.io import write_json
from calib.model import Model
from calib.runs import Run, RunStore
from calib.shard_merge import index_rows, merge_all, merge_without, read_index, write_index
from calib.stats import ActivationStats

__all__ = ["SHARD_SIZE", "plan_shards", "collect_sharded", "collect_into_run", "load_shards", "recalibrate",
           "Recalibration", "copy_shards"]

SHARD_SIZE = 4  # dropping a sample re-collects at most 3 others per touched shard
SHARDS_DIR = "shards"
Progress = Callable[[str, int, "int | None"], None]


def plan_shards(ids: Sequence[str], size: int = SHARD_SIZE) -> list[list[str]]:
    """Consecutive groups of ``size`` sample ids (the last may be shorter)."""
    if size < 1:
        raise ValueError("shard size must be >= 1")
    return [list(ids[k:k + size]) for k in range(0, len(ids), size)]


def _offset(progress: Progress | None, start: int, total: int) -> Progress | None:
    if progress is None:
        return None
    return lambda stage, done, _t: progress(stage, start + done, total)


def _subset(source, ids: Sequence[str]):
    index = {sid: k for k, sid in enumerate(pool_ids(source))}
    missing = [i for i in ids if i not in index]
    if missing:
        raise InputDataError(f"sample '{missing[0]}' is not in the calibration data any more ({len(missing)} missing)",
                             hint="the data changed since the run; start a new run")
    return source.subset([index[i] for i in ids])


def collect_sharded(model: Model, source, groups: Sequence[Sequence[str]], *, batch_size: int = 8,
                    providers: Sequence[str] | None = None, progress: Progress | None = None
                    ) -> list[ActivationStats]:
    """One ``ActivationStats`` per group of sample ids (one ``collect`` each; progress counts all samples)."""
    total = sum(len(g) for g in groups)
    out, done = [], 0
    for g in groups:
        out.append(collect(model, _subset(source, g), batch_size=batch_size, providers=providers,
                           progress=_offset(progress, done, total)))
        done += len(g)
    return out


def _save_shards(run: Run, shards: Sequence[ActivationStats | None], groups: Sequence[Sequence[str]], size: int,
                 rows: Sequence, names: Sequence[str], *, reuse: Sequence[Path | None] | None = None) -> None:
    """Write each shard (a reused shard's file is hard-linked, or copied, not serialised again), shards.json and
    the index of per-shard widths, minima and maxima (``calib.shard_merge``)."""
    (run.dir / SHARDS_DIR).mkdir(exist_ok=True)
    files = []
    for k, s in enumerate(shards):
        name = f"{SHARDS_DIR}/shard_{k:04d}.npz"
        old = reuse[k] if reuse is not None else None
        if old is None:
            s.save(run.dir / name)
        else:
            try:
                os.link(old, run.dir / name)
            except OSError:
                shutil.copyfile(old, run.dir / name)
        files.append(name)
    write_index(run.add_artifact("shards_index", f"{SHARDS_DIR}/index.npz"), names, rows)
    write_json(run.add_artifact("shards", "shards.json"),
               {"format": "calib.shards", "version": 1, "size": size,
                "shards": [{"file": f, "ids": list(g)} for f, g in zip(files, groups)]})


def collect_into_run(run: Run, model: Model, source, *, batch_size: int = 8, limit: int | None = None,
                     providers: Sequence[str] | None = None, progress: Progress | None = None,
                     shard_size: int = SHARD_SIZE) -> ActivationStats:
    """Collect ``source`` shard by shard into ``run`` (shards + shards.json) and return the merged total.

    Sources without sample ids or subsets, and ``limit``, fall back to one plain ``collect`` (no shards).
    """
    if limit or not hasattr(source, "subset"):
        return collect(model, source, batch_size=batch_size, limit=limit, providers=providers, progress=progress)
    groups = plan_shards(pool_ids(source), shard_size)
    shards = collect_sharded(model, source, groups, batch_size=batch_size, providers=providers, progress=progress)
    names = list(shards[0].tensors)
    _save_shards(run, shards, groups, shard_size, [index_rows(s, names) for s in shards], names)
    return merge_all(shards)


@dataclass
class ShardSet:
    size: int
    groups: list[list[str]]
    paths: list[Path]
    index: tuple[list[str], object] | None = None  # calib.shard_merge.read_index


def load_shards(run: Run) -> ShardSet | None:
    """The run's shard plan (None if it kept no shards)."""
    if "shards" not in run.manifest.get("artifacts", {}):
        return None
    doc = run.read_json("shards")
    if doc.get("format") != "calib.shards":
        raise RunStoreError(f"run {run.id}: shards.json is not a calib shard list")
    return ShardSet(int(doc["size"]), [list(s["ids"]) for s in doc["shards"]],
                    [run.dir / s["file"] for s in doc["shards"]], read_index(run.artifact("shards_index")))


def copy_shards(src: Run, run: Run) -> bool:
    """Give ``run`` the shards (hard links) of ``src``, whose statistics it reuses; False if ``src`` has none
    with an index (then re-calibrating ``run`` collects again)."""
    sh = load_shards(src)
    if sh is None or sh.index is None:
        return False
    names, rows = sh.index
    _save_shards(run, [None] * len(sh.paths), sh.groups, sh.size, list(rows), names, reuse=sh.paths)
    return True


@dataclass
class Recalibration:
    run: Run
    reused: int  # shards merged as they were
    recollected: int  # shards collected again (on their remaining samples)
    samples_collected: int
    seconds: float


def _plan_new(old: ShardSet | None, keep: Sequence[str], size: int) -> list[tuple[list[str], Path | None]]:
    """(ids, reusable shard file or None) per shard of the new run.

    Untouched shards are reused; the remaining samples of every touched shard form one new shard (one
    ``collect``, one ONNX Runtime session), placed where the first touched shard was.
    """
    if old is None:
        return [(g, None) for g in plan_shards(list(keep), size)]
    kept = set(keep)
    out: list[tuple[list[str], Path | None]] = []
    touched: list[str] | None = None
    for g, p in zip(old.groups, old.paths):
        rest = [i for i in g if i in kept]
        if len(rest) == len(g):
            out.append((rest, p))
        elif rest and touched is None:
            touched = list(rest)
            out.append((touched, None))
        elif rest:
            touched.extend(rest)
    return out


def _merge(old: Run, plan, fresh: list[ActivationStats]) -> tuple[ActivationStats, list, list, list[str]]:
    """(total, shards to write (None = reused), index rows, tensor names) of the new run.

    With the old run's index and total, the kept shards are not read (``calib.shard_merge.merge_without``);
    without them (older runs), every shard is read and merged.
    """
    sh = load_shards(old)
    pos = {p: k for k, p in enumerate(sh.paths)} if sh else {}
    kept = [pos[p] for _, p in plan if p is not None]
    if sh is None or sh.index is None or not kept or old.artifact("stats") is None:
        parts = [ActivationStats.load(p) if p is not None else None for _, p in plan]
        it = iter(fresh)
        parts = [s if s is not None else next(it) for s in parts]
        names = list(parts[0].tensors)
        return (merge_all(parts), [None if p is not None else s for s, (_, p) in zip(parts, plan)],
                [index_rows(s, names) for s in parts], names)
    names, rows = sh.index
    dropped = [ActivationStats.load(p) for k, p in enumerate(sh.paths) if k not in set(kept)]
    rest = merge_without(ActivationStats.load(old.artifact("stats")), dropped, sh.index, kept,
                         [sh.paths[k] for k in kept])
    it = iter(fresh)
    shards = [None if p is not None else next(it) for _, p in plan]
    new_rows = [rows[pos[p]] if p is not None else index_rows(s, names) for s, (_, p) in zip(shards, plan)]
    return merge_all([rest, *fresh]), shards, new_rows, names


def _methods_used(old: Run, primary: str, advice: dict | None) -> tuple[str, dict[str, str]]:
    """(base method, tensor -> method) of the old run's shipped model: ``auto``'s per-tensor candidates
    (``auto.json``), then the per-tensor methods its advise chose."""
    changed: dict[str, str] = {}
    base = primary
    if primary == "auto" and "auto" in old.manifest.get("artifacts", {}):
        doc = old.read_json("auto")
        base = parse_method(doc["base_method"]).label
        changed = {t: r["chosen"] for t, r in doc.get("tensors", {}).items() if r.get("chosen") not in (None, base)}
    elif primary == "auto":
        raise RunStoreError(f"run {old.id}: method 'auto' but no auto.json: its per-tensor choice is unknown",
                            hint="re-run it, or re-calibrate a run of a named method")
    base = parse_method(base).label
    changed.update((advice or {}).get("changed_methods") or {})
    return base, changed


def _final_ranges(ranges: dict[str, Ranges], primary: str, changed: dict[str, str]) -> Ranges:
    """The primary method's ranges, with the per-tensor methods the old run chose (auto, advise)."""
    base = ranges[primary]
    if not changed:
        return base
    tensors = {t: (ranges[m].tensors[t] if m in ranges and t in ranges[m].tensors else r)
               for t, r in base.tensors.items() for m in [changed.get(t, primary)]}
    return Ranges("mixed", tensors, base.model_sha256)


def recalibrate(store: RunStore, old: Run, model: Model, source, keep_ids: Sequence[str], *,
                all_methods: bool = False, progress: Progress | None = None,
                command: list[str] | None = None) -> Recalibration:
    """A new run on ``keep_ids`` of ``source`` (the old run's calibration data), ranges only (see the module doc).

    ``all_methods=False`` calibrates only the methods the exported model uses (the run's method and those
    its advise chose per tensor); True, every method of the old run's config.
    """
    t0 = time.perf_counter()
    if not keep_ids:
        raise InputDataError("every sample was dropped", hint="keep at least one sample")
    cfg = old.read_json("config") if "config" in old.manifest.get("artifacts", {}) else {}
    old_shards = load_shards(old)
    plan = _plan_new(old_shards, keep_ids, old_shards.size if old_shards else SHARD_SIZE)
    run = store.create(f"{old.manifest.get('name') or 'run'}-recal", command=command or ["calib", "dashboard"],
                       config={**cfg, "recalibrated_from": old.id}, model=old.manifest.get("model"),
                       data=old.manifest.get("data"), method=old.manifest.get("method", ""))
    try:
        return _recalibrate(run, old, model, source, plan, cfg, progress, t0, all_methods)
    except BaseException as e:
        run.fail(f"{type(e).__name__}: {e}")
        raise


def _recalibrate(run: Run, old: Run, model: Model, source, plan, cfg: dict, progress, t0: float,
                 all_methods: bool) -> Recalibration:
    todo = [ids for ids, p in plan if p is None]
    with run.timing("collect"):
        fresh = iter(collect_sharded(model, source, todo, batch_size=int(cfg.get("batch_size") or 8),
                                     providers=cfg.get("providers"), progress=progress))
    with run.timing("merge"):
        stats, shards, rows, names = _merge(old, plan, list(fresh))
        groups = [ids for ids, _ in plan]
        _save_shards(run, shards, groups, max(len(g) for g in groups), rows, names, reuse=[p for _, p in plan])
        stats.save(run.add_artifact("stats", "stats.npz"))
    keep = [i for g in groups for i in g]
    write_json(run.add_artifact("calib_ids", "calib_ids.json"), keep)
    for key in ("preprocess", "auto"):  # the spec, and auto's per-tensor choice that re-calibration keeps
        if key in old.manifest.get("artifacts", {}):
            shutil.copyfile(old.artifact(key), run.add_artifact(key, old.manifest["artifacts"][key]))
    methods = list(cfg.get("methods") or ["entropy", "minmax", "percentile", "mse"])
    primary = old.manifest.get("method") or methods[0]
    advice = old.read_json("advise") if "advise" in old.manifest.get("artifacts", {}) else None
    base, changed = _methods_used(old, primary, advice)
    used = [base, *sorted(set(changed.values()))]
    with run.timing("calibrate"):
        ranges = calibrate_all(stats, list(dict.fromkeys([*(methods if all_methods else []), *used])))
        save_ranges(run.add_artifact("ranges", "ranges.json"), ranges, weight_ranges(model), stats)
    exclude = list(dict.fromkeys([*(cfg.get("exclude") or []), *((advice or {}).get("exclude") or [])]))
    chosen = _final_ranges(ranges, base, changed)
    with run.timing("export"):
        q = export_qdq(model, chosen, placement=cfg.get("placement") or "trt", exclude=exclude)
        stamp_model(q.model, _spec(old))
        q.save(run.add_artifact("model", "model.int8.onnx"))
        if cfg.get("cache", True):
            write_cache(run.add_artifact("cache", "model.cache"), chosen)
        write_scale_report(run.add_artifact("scales", "scales.json"),
                           scale_report(q, ranges, chosen=base, stats=stats))
    result = Recalibration(run, sum(p is not None for _, p in plan), len(todo), sum(len(g) for g in todo),
                           time.perf_counter() - t0)
    run.update(n_samples=stats.n_samples, recalibrated_from=old.id)
    run.set_metrics({"method": primary, "float_nodes": len(exclude), "shards_reused": result.reused,
                     "shards_recollected": result.recollected, "samples_collected": result.samples_collected,
                     "recalibrate_s": round(result.seconds, 3)})
    run.complete()
    return result


def _spec(run: Run) -> PreprocessSpec | None:
    if "preprocess" not in run.manifest.get("artifacts", {}):
        return None
    return PreprocessSpec.from_dict(json.loads(run.artifact("preprocess").read_text()))
