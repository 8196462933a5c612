"""The peers benchmark's own machinery: table generation from a results file, goal verdicts, README markers,
and the process-tree memory measurement (no timing assertions; those numbers live in bench/results/)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from bench_modules import import_bench

procmon, table = import_bench('procmon', 'table')

MACHINE = {"cpu": "test cpu", "cores": 2, "mem_gib": 24.0, "os": "linux"}


def rec(model, tool, variant, n, *, wall=1.0, rss=100.0, metric=None, fp32=95.0, status="ok", error=None, float_nodes=0):
    r = {"suite": "quick", "time": "2026-01-01T00:00:00", "model": model, "tool": tool, "variant": variant, "n": n,
         "status": status, "wall_s": wall, "peak_rss_mb": rss, "machine": MACHINE, "command": "python bench/peers/run.py --suite quick"}
    if metric is not None:
        r["metrics"] = {"primary": metric, "primary_fp32": fp32, "primary_name": "accuracy %", "float_nodes": float_nodes}
    if error:
        r["error"] = error
    return r


def write(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.fixture
def results(tmp_path) -> Path:
    recs = [
        rec("cnn", "ort", "minmax", 500, wall=20.0, rss=900.0, metric=93.0),
        rec("cnn", "ort", "entropy2048", 500, wall=60.0, rss=4000.0, metric=94.0),
        rec("cnn", "ort", "entropy2048", 100, wall=15.0, rss=1000.0, metric=93.5),
        rec("cnn", "nncf", "default", 500, status="failed", error="RuntimeError: boom | in node x"),
        rec("cnn", "calib", "collect", 100, wall=2.0, rss=300.0),
        rec("cnn", "calib", "collect", 500, wall=5.0, rss=310.0),
        rec("cnn", "calib", "calibrate", 500, wall=3.0, rss=200.0),
        rec("cnn", "calib", "export:entropy", 500, wall=2.0, rss=200.0, metric=94.5),
        rec("cnn", "calib", "export:minmax", 500, wall=2.0, rss=200.0, metric=92.0),
        rec("cnn", "calib", "advise:cosine:0.99", 500, wall=9.0, rss=200.0, metric=95.0, float_nodes=3),
        rec("cnn", "polygraphy", "compare", 100, wall=40.0, rss=2000.0),
        rec("cnn", "calib", "compare", 100, wall=5.0, rss=300.0),
        rec("det", "ort", "minmax", 500, wall=10.0, metric=99.0, fp32=100.0),
        rec("det", "calib", "export:entropy", 500, metric=98.0, fp32=100.0),
    ]
    for i, cpu in [(1, 40.0), (5, 4.0), (6, 2.0), (7, 2.0)]:  # ORT entropy2048 and calib's three steps at N=500
        recs[i]["cpu_s"] = cpu
    for r in recs[10:12]:
        r["int8_compared"] = "calib export entropy N=100"
    for r in recs[-2:]:
        r["metrics"]["primary_name"] = "text-map IoU vs FP32 %"
    return write(tmp_path / "peers-quick.jsonl", recs)


def test_metric_goal_verdicts(results):
    md, _ = table.render(results)
    cnn = next(line for line in md.splitlines() if line.startswith("| cnn (accuracy %) | 500 |"))
    # calib's best all-INT8 is entropy 94.5 (advise keeps float nodes, so it is not counted); best peer 94.0
    assert "94.50 (entropy)" in cnn and "94.00 (ORT entropy 2048 bins)" in cnn and "+0.50" in cnn and "| met |" in cnn
    det = next(line for line in md.splitlines() if line.startswith("| det ("))
    assert "98.00 (entropy)" in det and "-1.00" in det and "**missed**" in det
    assert "det N=500: calib's best INT8 98.00 (entropy) vs ORT minmax 99.00." in md


def test_time_ratio_and_goal(results):
    md, _ = table.render(results)
    line = next(ln for ln in md.splitlines() if ln.startswith("| cnn | 500 | 10.0 |"))
    # calib = collect 5 + calibrate 3 + export 2 = 10 s; ORT entropy2048 60 s -> 6.0x, minmax 20 s -> 2.0x
    assert "60.0 (6.0×)" in line and "20.0 (2.0×)" in line and "6.0× met, CPU time 5.0×" in line
    assert "failed¹" in line  # nncf failed at N=500: shown, not left out


def test_memory_compare_and_failures(results):
    md, summary = table.render(results)
    mem = next(ln for ln in md.splitlines() if ln.startswith("| cnn | calib collect |"))
    assert "| 300 | 310 | 1.03× | flat: met |" in mem
    ort = next(ln for ln in md.splitlines() if ln.startswith("| cnn | ORT entropy 2048 |"))
    assert "| 1000 | 4000 | 4.00× |" in ort
    cmp_ = next(ln for ln in md.splitlines() if ln.startswith("| cnn | 100 | calib export entropy N=100 |"))
    assert "40.0 (2000)" in cmp_ and "5.0 (300)" in cmp_ and "8.0×" in cmp_ and "**missed**" in cmp_
    assert "- nncf:default — RuntimeError: boom \\| in node x (cnn@500)" in md
    assert "| cnn | 94.50 | 94.00 (ORT entropy 2048 bins; " in summary and "| 6.0× faster (N=500) | 8.0× faster |" in summary


def test_update_readmes_between_markers(results, tmp_path):
    bench_readme = tmp_path / "bench.md"
    bench_readme.write_text("# Benchmarks\n\nintro\n\n<!-- peers:quick:begin -->\nold\n<!-- peers:quick:end -->\n\ntail\n")
    main = tmp_path / "main.md"
    main.write_text("# calib\n<!-- peers:begin -->\nold\n<!-- peers:end -->\nrest\n")
    no_markers = tmp_path / "plain.md"
    no_markers.write_text("# untouched\n")
    table.update_readmes(results, readme=bench_readme, main_readme=main)
    text = bench_readme.read_text()
    assert "old" not in text and text.startswith("# Benchmarks\n\nintro") and text.endswith("tail\n")
    assert "### INT8 task metric" in text
    assert "| cnn | 94.50 |" in main.read_text() and main.read_text().endswith("rest\n")
    table.update_readmes(results, readme=bench_readme, main_readme=no_markers)
    assert no_markers.read_text() == "# untouched\n"


def test_procmon_counts_the_whole_tree(tmp_path):
    # a parent that starts a child holding ~300 MB: the tree peak must include the child's memory
    child = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}], check=True)"
    run = procmon.run_measured([sys.executable, "-c", parent], log_dir=tmp_path / "job", interval_s=0.02)
    assert run.returncode == 0 and run.killed_reason is None
    assert run.peak_rss_mb > 300


def test_procmon_memory_guard_kills_the_tree(tmp_path):
    hog = "import time; b = bytearray(400 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(30)"
    run = procmon.run_measured([sys.executable, "-c", hog], log_dir=tmp_path / "job", mem_limit_mb=200, interval_s=0.02)
    assert run.killed_reason and "memory guard of 200 MB" in run.killed_reason
    assert run.returncode != 0


def test_evaluator_metrics_against_numpy():
    import evaluate

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 4)).astype(np.float32)
    got = ref + rng.normal(scale=0.5, size=ref.shape).astype(np.float32)
    labels = ref.argmax(1).copy()
    labels[:5] = (labels[:5] + 1) % 4
    m = evaluate.metrics("classify", ref, got, labels)
    assert m["top1_agreement"] == pytest.approx((ref.argmax(1) == got.argmax(1)).mean() * 100)
    assert m["accuracy_fp32"] == pytest.approx(90.0)
    cos = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(ref, got)]
    assert m["cosine_mean"] == pytest.approx(np.mean(cos), rel=1e-6)
    dense = evaluate.metrics("dense", np.array([[0.9, 0.1, 0.5, 0.2]]), np.array([[0.8, 0.4, 0.1, 0.1]]), None)
    assert dense["map_iou"] == pytest.approx(100 * 1 / 3)  # fp32 {0, 2}, int8 {0, 1}: 1 common of 3


def one_hot_steps(paths: list[list[int]], classes: int) -> np.ndarray:
    """[N, T, classes] probabilities whose per-step argmax is the given class path."""
    out = np.full((len(paths), len(paths[0]), classes), 0.01, np.float32)
    for i, path in enumerate(paths):
        out[i, np.arange(len(path)), path] = 0.9
    return out


def test_ctc_metrics_by_hand():
    import evaluate

    # classes: 0 blank, 1 'a', 2 'b', 3 'c', 4 space. Greedy CTC: collapse repeats, then drop blanks.
    ref = one_hot_steps([[1, 1, 0, 1, 2, 4, 3, 0], [2, 0, 3, 3, 3, 0, 0, 0]], 5)  # "aab c", "bc"
    got = one_hot_steps([[4, 1, 0, 1, 2, 4, 4, 3], [2, 2, 2, 0, 0, 0, 0, 1]], 5)  # " aab c", "ba"
    assert evaluate.ctc_decode(ref) == [[1, 1, 2, 4, 3], [2, 3]]
    labels = {"ids": [[1, 2, 4, 3], [2, 3]], "space": 4}  # "ab c", "bc": spaces are ignored, as PaddleOCR does
    m = evaluate.metrics("ctc", ref, got, labels)
    assert m["cer_fp32"] == pytest.approx(100 * 1 / 5)  # "aabc" vs "abc": 1 insertion; "bc" exact; 5 label chars
    assert m["cer_int8"] == pytest.approx(100 * 2 / 5)  # plus "ba" vs "bc": 1 substitution
    assert m["primary"] == pytest.approx(60.0) and m["primary_fp32"] == pytest.approx(80.0)
    assert m["decode_agreement"] == pytest.approx(50.0)  # the leading space does not count
    assert m["cer_vs_fp32"] == pytest.approx(100 * 1 / 6)  # "ba" against the FP32 "bc" ("aabc" equal)
    assert evaluate.edit_distance(list("kitten"), list("sitting")) == 3


def test_rerun_supersedes_an_earlier_failure(tmp_path):
    recs = [rec("cnn", "ort", "entropy2048", 500, status="failed", error="killed: memory guard of 10240 MB"),
            rec("cnn", "ort", "entropy2048", 500, wall=80.0, rss=12000.0, metric=94.0),
            rec("cnn", "ort", "minmax", 500, metric=93.0)]
    md, _ = table.render(write(tmp_path / "peers-quick.jsonl", recs))
    assert "- earlier attempt, re-run later in this file: ort:entropy2048 cnn@500 — killed: memory guard of 10240 MB" in md
    assert "94.00 (ORT entropy 2048 bins)" in md  # the re-run's result is the one in the tables


def test_main_summary_comes_from_the_suite_covering_most_models(tmp_path):
    write(tmp_path / "peers-quick.jsonl", [rec("cnn", "ort", "minmax", 100, metric=93.0),
                                           rec("det", "ort", "minmax", 100, metric=90.0)])
    full = write(tmp_path / "peers-full.jsonl", [rec("cnn", "ort", "minmax", 100, metric=91.0)])
    main = tmp_path / "main.md"
    main.write_text("<!-- peers:begin -->\n<!-- peers:end -->\n")
    table.update_readmes(full, readme=tmp_path / "bench.md", main_readme=main)
    text = main.read_text()
    assert "| det |" in text and "93.00" in text and "91.00" not in text
    assert "91.00" in (tmp_path / "bench.md").read_text()
