"""Measure ``--method auto`` and ``advise`` (issue 15) on one case; one process per measurement (peak RSS).

    python bench/auto_measure.py fmnist auto     # per-tensor choice vs single methods, held-out eval data
    python bench/auto_measure.py fmnist advise   # advise --target cosine:0.99 without eval data: time, RSS
    python bench/auto_measure.py demo advise

Statistics on all calibration samples (first ``--n-calib``), choices on the selection part of the split by
sample id, figures on the evaluation data (never used to choose). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from calib.calibrate import calibrate
from calib.collect import collect
from calib.compare import compare
from calib.compare.advice import advise
from calib.compare.auto import CANDIDATES, choose_auto
from calib.data import ListSource, open_data
from calib.data.split import split_source
from calib.errors import TargetNotMet
from calib.export import export_qdq
from calib.model import load_model

FMNIST = Path("/work/shared/cases/fmnist_cnn")


def _case(name: str, n_calib: int, work: Path):
    if name == "fmnist":
        fm = load_model(FMNIST / "model.onnx")
        return fm, open_data(FMNIST / "calib.npz", fm), open_data(FMNIST / "eval.npz", fm)
    from calib.demo import build_demo_data, demo_model_path

    data = build_demo_data(work / "demo_data", n_calib, 192)
    fm = load_model(demo_model_path())
    return fm, open_data(data / "calib", fm), open_data(data / "eval", fm)


def _rss() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0)


def _first(src, n: int) -> ListSource:
    out = []
    for i, s in enumerate(src):
        if i >= n:
            break
        out.append(s)
    return ListSource(out, layout=src.layout, name="calib")


def _held_out(fm, q, ev) -> dict:
    r = compare(fm, q, ev, layers=False, batch_size=32).outputs
    o = next(v for k, v in r.items() if not k.startswith("_"))
    return {"top1_agreement": o.get("top1_agreement"), "cosine": o["cosine"], "sqnr_db": o["sqnr_db"]}


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("case", choices=["fmnist", "demo"])
    p.add_argument("mode", choices=["auto", "advise"])
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--target", default="cosine:0.99")
    p.add_argument("--work", type=Path, default=Path("/tmp/auto_bench"))
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    fm, calib_src, ev = _case(a.case, a.n_calib, a.work)
    calib_src = _first(calib_src, a.n_calib)
    stats = collect(fm, calib_src, batch_size=32)
    sp = split_source(calib_src)
    out: dict = {"case": a.case, "mode": a.mode, "target": a.target, "n_calib": len(calib_src), "n_select": len(sp.select),
                 "n_eval": len(ev), "collect_s": round(time.perf_counter() - t0, 1), "rss_after_collect_mb": _rss()}
    if a.mode == "auto":
        t1 = time.perf_counter()
        ch = choose_auto(fm, stats, sp.select, batch_size=32)
        out["auto_s"] = round(time.perf_counter() - t1, 1)
        out["auto"] = _held_out(fm, export_qdq(fm, ch.ranges), ev)
        out["changed"] = len(ch.changed)
        out["base_method"] = ch.base_method
        out["singles"] = {c: _held_out(fm, export_qdq(fm, calibrate(stats, c)), ev) for c in CANDIDATES}
    else:
        t1 = time.perf_counter()
        try:
            adv = advise(fm, stats, sp.select, target=a.target, batch_size=32)
        except TargetNotMet as e:
            adv = e.advice
        out["advise_s"] = round(time.perf_counter() - t1, 1)
        out["rss_after_advise_mb"] = _rss()
        out.update(met=adv.met, selection_metric=adv.metric, gap=adv.gap, float_nodes=len(adv.exclude),
                   steps=len(adv.curve) - 1, stopped=adv.stopped, base=adv.base_method)
        out["held_out"] = _held_out(fm, adv.qdq, ev)
    out["total_s"] = round(time.perf_counter() - t0, 1)
    out["peak_rss_mb"] = _rss()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
