"""Markdown tables from ``bench/results/peers-<suite>.jsonl``, written between markers in bench/README.md
(``<!-- peers:<suite>:begin -->`` ... ``<!-- peers:<suite>:end -->``) and, as a short summary, in the main
README between ``<!-- peers:begin -->`` and ``<!-- peers:end -->`` (skipped when those markers are missing).

Goals (issue 9): calib's best all-INT8 metric at least the best peer's, and better where the best peer loses
more than 0.5 points against FP32; calib collection+calibration >= 5x faster than ONNX Runtime's Entropy with
2048 bins at N = 500; calib's peak memory flat in N (within 10 %) where ONNX Runtime's grows; calib compare
>= 10x faster than Polygraphy's per-layer comparison of the same models and data.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calib_tables  # noqa: E402

BENCH = Path(__file__).resolve().parents[1]
REPO = BENCH.parent
PEER_COLS = [("ort", "minmax"), ("ort", "entropy"), ("ort", "entropy2048"), ("ort", "percentile"),
             ("modelopt", "entropy"), ("modelopt", "max"), ("nncf", "default"), ("nncf", "histogram")]
CALIB_INT8 = ["export:minmax", "export:percentile", "export:entropy", "export:mse", "quantize:best"]
LABEL = {("ort", "entropy2048"): "ORT entropy 2048 bins", ("ort", "entropy"): "ORT entropy (128 bins)",
         ("ort", "minmax"): "ORT minmax", ("ort", "percentile"): "ORT percentile 99.999",
         ("modelopt", "entropy"): "ModelOpt entropy", ("modelopt", "max"): "ModelOpt max",
         ("nncf", "default"): "NNCF default", ("nncf", "histogram"): "NNCF histogram"}


def load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Results:
    def __init__(self, recs: list[dict]) -> None:
        self.recs = recs
        self.by = {(r["model"], r["tool"], r["variant"], r.get("n")): r for r in recs}
        self.models = list(dict.fromkeys(r["model"] for r in recs))

    def get(self, model, tool, variant, n) -> dict | None:
        return self.by.get((model, tool, variant, n))

    def sizes(self, model, tool=None, variant=None) -> list[int]:
        return sorted({r["n"] for r in self.recs if r["model"] == model and r.get("n") is not None
                       and (tool is None or r["tool"] == tool) and (variant is None or r["variant"] == variant)})

    def metric(self, model, tool, variant, n) -> float | None:
        r = self.get(model, tool, variant, n)
        if r and r["status"] == "ok" and "metrics" in r:
            return r["metrics"]["primary"]
        return None


def cell_metric(res: Results, model, tool, variant, n) -> str:
    r = res.get(model, tool, variant, n)
    if r is None:
        return "–"
    if r["status"] != "ok":
        return "failed¹"
    m = r["metrics"]
    s = f"{m['primary']:.2f}"
    if m.get("float_nodes"):
        s += f" ({m['float_nodes']} float)"
    if r.get("target_met") is False:
        s += " (target not met²)"
    return s


def first_metrics(res: Results, model) -> dict | None:
    for r in res.recs:
        if r["model"] == model and r["status"] == "ok" and "metrics" in r:
            return r["metrics"]
    return None


def secs(r: dict | None) -> float | None:
    return r["wall_s"] if r and r["status"] == "ok" else None


def calib_pipeline_s(res: Results, model, n, key: str = "wall_s") -> float | None:
    """collect + calibrate (all four methods) + export (entropy): three processes, each with its start-up."""
    recs = [res.get(model, "calib", v, n) for v in ("collect", "calibrate", "export:entropy")]
    if any(r is None or r["status"] != "ok" or r.get(key) is None for r in recs[:2]):
        return None
    return sum(r[key] for r in recs if r is not None and r["status"] == "ok" and r.get(key) is not None)


def metric_section(res: Results, notes: list[str]) -> list[str]:
    out = ["### INT8 task metric (higher is better)", "",
           "Primary metric per model: accuracy with labels (%), else top-1 agreement with FP32 (%); text-map IoU",
           "with FP32 (%) for the detector; mean embedding cosine x100 for the encoder; 100 - character error rate (%)",
           "for the text recogniser. `(k float)`: k Conv/Gemm/MatMul",
           "nodes left in float. calib's best is over its all-INT8 models (four methods and `--method best`).", "",
           "| model | N | FP32 | calib best (all INT8) | best peer | calib − peer | goal |", "|---|---|---|---|---|---|---|"]
    for model in res.models:
        m0 = first_metrics(res, model)
        for n in res.sizes(model, "ort", "minmax") or res.sizes(model):
            peers = [(res.metric(model, t, v, n), f"{LABEL[(t, v)]}") for t, v in PEER_COLS]
            peers = [p for p in peers if p[0] is not None]
            cal = [(res.metric(model, "calib", v, n), v.split(":")[1]) for v in CALIB_INT8]
            cal = [c for c in cal if c[0] is not None]
            fp32 = m0["primary_fp32"] if m0 else None
            bp = max(peers) if peers else None
            bc = max(cal) if cal else None
            if bc and bp:
                loss = fp32 - bp[0] if fp32 is not None else 0.0
                met = bc[0] >= bp[0] - 1e-9 and (loss <= 0.5 or bc[0] > bp[0])
                goal = "met" if met else "**missed**"
                if not met:
                    notes.append(f"{model} N={n}: calib's best INT8 {bc[0]:.2f} ({bc[1]}) vs {bp[1]} {bp[0]:.2f}.")
                diff = f"{bc[0] - bp[0]:+.2f}"
            else:
                goal, diff = "**missed** (no calib result)" if bp else "n/a", "–"
                if bp:
                    notes.append(f"{model} N={n}: no calib INT8 result (see failures).")
            fp = f"{fp32:.2f}" if fp32 is not None else "–"
            out.append(f"| {model} ({m0['primary_name'] if m0 else '?'}) | {n} | {fp} | "
                       f"{f'{bc[0]:.2f} ({bc[1]})' if bc else 'failed¹'} | {f'{bp[0]:.2f} ({bp[1]})' if bp else 'failed¹'} | {diff} | {goal} |")
    out += ["", "All variants:", "",
            "| model | N | " + " | ".join(LABEL[c] for c in PEER_COLS) + " | calib minmax | calib percentile | calib entropy | calib mse | calib best | calib advise |",
            "|---|---|" + "---|" * (len(PEER_COLS) + 6)]
    for model in res.models:
        for n in res.sizes(model, "ort", "minmax") or res.sizes(model):
            cells = [cell_metric(res, model, t, v, n) for t, v in PEER_COLS]
            cells += [cell_metric(res, model, "calib", v, n) for v in CALIB_INT8]
            adv = [r for r in res.recs if r["model"] == model and r["tool"] == "calib" and r["variant"].startswith("advise") and r.get("n") == n]
            cells.append(cell_metric(res, model, "calib", adv[0]["variant"], n) if adv else "–")
            out.append(f"| {model} | {n} | " + " | ".join(cells) + " |")
    return out


def time_section(res: Results, notes: list[str]) -> list[str]:
    out = ["### Collection + calibration time", "",
           "calib = `calib collect` + `calib calibrate --method all` + `calib export --method entropy` (three processes,",
           "start-up included); each peer = its whole quantization job (one process: load, calibrate, write the model).",
           "Cells: peer wall seconds (peer time / calib time). Goal: ≥ 5× against ORT entropy with 2048 bins at N = 500",
           "(wall time; the ratio of CPU time, user + system over the process tree, is shown beside it).", "",
           "| model | N | calib s | " + " | ".join(LABEL[c] for c in PEER_COLS) + " | goal (≥5× vs ORT entropy 2048) |",
           "|---|---|---|" + "---|" * (len(PEER_COLS) + 1)]
    for model in res.models:
        for n in res.sizes(model, "calib", "collect"):
            c = calib_pipeline_s(res, model, n)
            cells = []
            for t, v in PEER_COLS:
                r = res.get(model, t, v, n)
                if r is None:
                    cells.append("–")
                elif r["status"] != "ok":
                    cells.append("failed¹")
                else:
                    cells.append(f"{r['wall_s']:.1f}" + (f" ({r['wall_s'] / c:.1f}×)" if c else ""))
            ref = res.get(model, "ort", "entropy2048", n)
            if n != 500:
                goal = ""
            elif c is None:
                goal = "**missed** (calib failed)"
                notes.append(f"{model} N=500: no calib collect+calibrate time (see failures).")
            elif ref is None or ref["status"] != "ok":
                goal = "n/a (ORT failed)"
            else:
                ratio = ref["wall_s"] / c
                ccpu = calib_pipeline_s(res, model, n, "cpu_s")
                cpu = f", CPU time {ref['cpu_s'] / ccpu:.1f}×" if ccpu and ref.get("cpu_s") else ""
                goal = (f"{ratio:.1f}× met" if ratio >= 5 else f"{ratio:.1f}× **missed**") + cpu
                if ratio < 5:
                    notes.append(f"{model} N=500: calib {c:.1f} s vs ORT entropy 2048 bins {ref['wall_s']:.1f} s = {ratio:.1f}× (goal 5×{cpu}).")
            out.append(f"| {model} | {n} | {f'{c:.1f}' if c else 'failed¹'} | " + " | ".join(cells) + f" | {goal} |")
    return out


def memory_section(res: Results, notes: list[str]) -> list[str]:
    jobs = [("calib", "collect", "calib collect"), ("ort", "entropy2048", "ORT entropy 2048"), ("ort", "minmax", "ORT minmax"),
            ("modelopt", "entropy", "ModelOpt entropy"), ("nncf", "default", "NNCF default")]
    sizes = sorted({r["n"] for r in res.recs if r.get("n") and r["variant"] in ("collect", "entropy2048")})
    out = ["### Peak memory (MB, RSS of the job's process tree) against N", "",
           "Goal: calib flat in N (within 10 %) where ONNX Runtime's grows.", "",
           "| model | job | " + " | ".join(f"N={n}" for n in sizes) + " | growth | goal |", "|---|---|" + "---|" * (len(sizes) + 2)]
    for model in res.models:
        for tool, variant, label in jobs:
            vals = []
            for n in sizes:
                r = res.get(model, tool, variant, n)
                vals.append(None if r is None else (r["peak_rss_mb"] if r["status"] == "ok" else "failed"))
            if all(v is None for v in vals):
                continue
            nums = [v for v in vals if isinstance(v, float)]
            growth = f"{nums[-1] / nums[0]:.2f}×" if len(nums) >= 2 else "–"
            goal = ""
            if tool == "calib" and len(nums) >= 2:
                flat = nums[-1] <= nums[0] * 1.10
                goal = "flat: met" if flat else "**missed**"
                if not flat:
                    notes.append(f"{model}: calib collect peak RSS {nums[0]:.0f} MB -> {nums[-1]:.0f} MB from N={sizes[0]} to N={sizes[-1]}.")
            cells = ["–" if v is None else (v if isinstance(v, str) else f"{v:.0f}") for v in vals]
            cells = [c if c != "failed" else "failed¹" for c in cells]
            out.append(f"| {model} | {label} | " + " | ".join(cells) + f" | {growth} | {goal} |")
    return out


def compare_section(res: Results, notes: list[str]) -> list[str]:
    out = ["### Per-layer FP32 vs INT8 comparison: Polygraphy vs `calib compare`", "",
           "Same FP32 and INT8 models and evaluation samples. Polygraphy: `polygraphy run --onnxrt --onnx-outputs mark all`",
           "on the FP32 model (`--save-outputs`), then on the INT8 model (`--load-outputs`, compares every common tensor).", "",
           "| model | samples | INT8 model | Polygraphy s (MB) | calib compare s (MB) | speed-up | goal (≥10×) |", "|---|---|---|---|---|---|---|"]
    for model in res.models:
        ks = sorted({r["n"] for r in res.recs if r["model"] == model and r["variant"] == "compare" and r.get("n")})
        for k in ks:
            p, c = res.get(model, "polygraphy", "compare", k), res.get(model, "calib", "compare", k)

            def fmt(r):
                if r is None:
                    return "–"
                return f"{r['wall_s']:.1f} ({r['peak_rss_mb']:.0f})" if r["status"] == "ok" else "failed¹"
            src = (p or c or {}).get("int8_compared", "?")
            if p and c and p["status"] == "ok" and c["status"] == "ok":
                sp = p["wall_s"] / c["wall_s"]
                goal = "met" if sp >= 10 else "**missed**"
                if sp < 10:
                    notes.append(f"{model} compare on {k} samples: {sp:.1f}× faster than Polygraphy (goal 10×).")
                sps = f"{sp:.1f}×"
            elif c and c["status"] == "ok":
                sps, goal = "–", "n/a (Polygraphy failed¹)"
            else:
                sps, goal = "–", "**missed** (calib compare failed¹)"
                notes.append(f"{model} compare on {k} samples: calib compare failed (see failures).")
            out.append(f"| {model} | {k} | {src} | {fmt(p)} | {fmt(c)} | {sps} | {goal} |")
    return out


def failures_section(res: Results) -> list[str]:
    def latest(r):
        return res.by[(r["model"], r["tool"], r["variant"], r.get("n"))] is r

    fails = [r for r in res.recs if r["status"] != "ok" and latest(r)]
    earlier = [r for r in res.recs if r["status"] != "ok" and not latest(r)]
    out = ["### ¹ Failures (recorded, not left out)", ""]
    if not fails:
        out.append("None.")
    for r in earlier:
        out.append(f"- earlier attempt, re-run later in this file: {r['tool']}:{r['variant']} {r['model']}@{r.get('n')} — "
                   + re.sub(r"\s+", " ", r.get("error", "?")).replace("|", "\\|")[:300])
    seen: dict[str, list[str]] = {}
    for r in fails:
        err = re.sub(r"\s+", " ", r.get("error", "?")).replace("|", "\\|")[:300]
        seen.setdefault(f"{r['tool']}:{r['variant']} — {err}", []).append(f"{r['model']}@{r.get('n')}")
    for k, where in seen.items():
        out.append(f"- {k} ({', '.join(where)})")
    missed = [r for r in res.recs if r.get("target_met") is False and latest(r) and r["variant"].startswith("advise")]
    if missed:
        out += ["", "### ² advise: target not met within the job's budget (its best model is scored)", ""]
        for r in missed:
            err = re.sub(r"\s+", " ", r.get("target_error", "?")).replace("|", "\\|")[:300]
            out.append(f"- {r['model']}@{r.get('n')}: {err}")
    return out


def rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def render(path: Path) -> tuple[str, str]:
    """(full markdown for bench/README.md, short summary for the main README)."""
    recs = load(path)
    if not recs:
        return f"_No results yet in `{rel(path)}`._", ""
    res = Results(recs)
    mach = recs[0]["machine"]
    notes: list[str] = []
    body = [f"Results: `{rel(path)}` ({len(recs)} jobs, {recs[0]['time']} … {recs[-1]['time']}).",
            f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['mem_gib']} GiB; command: `{recs[0]['command']}`.", ""]
    body += metric_section(res, notes) + [""] + time_section(res, notes) + [""] + memory_section(res, notes)
    body += [""] + compare_section(res, notes)
    body += [""] + calib_tables.section(res, notes, PEER_COLS, LABEL)
    body += [""] + failures_section(res) + ["", "### Goals missed", ""]
    body += [f"- {n}" for n in notes] if notes else ["None."]
    summary = [f"Peers benchmark (`python bench/peers/run.py --suite {recs[0]['suite']}`, {mach['cores']} cores; details in "
               "[bench/README.md](bench/README.md)):", "", "| model | calib best INT8 | best peer | vs ORT entropy 2048 (time) | "
               "compare vs Polygraphy | calib default (N=128) | `--target cosine:0.99` |", "|---|---|---|---|---|---|---|"]
    for model in res.models:
        ns = res.sizes(model, "ort", "minmax") or [None]
        n = ns[-1]
        cal = [x for x in (res.metric(model, "calib", v, n) for v in CALIB_INT8) if x is not None]
        peers = [(res.metric(model, t, v, n), LABEL[(t, v)], res.get(model, t, v, n)) for t, v in PEER_COLS]
        peers = [p for p in peers if p[0] is not None]
        bp = max(peers, key=lambda p: p[0]) if peers else None
        t500 = calib_pipeline_s(res, model, 500)
        ref = res.get(model, "ort", "entropy2048", 500)
        tr = f"{ref['wall_s'] / t500:.1f}× faster (N=500)" if t500 and ref and ref["status"] == "ok" else "–"
        cmp_ = [(res.get(model, "polygraphy", "compare", k), res.get(model, "calib", "compare", k))
                for k in sorted({r["n"] for r in recs if r["model"] == model and r["variant"] == "compare" and r.get("n")})]
        cmp_ = [(p, c) for p, c in cmp_ if p and c and p["status"] == "ok" and c["status"] == "ok"]
        cs = f"{cmp_[-1][0]['wall_s'] / cmp_[-1][1]['wall_s']:.1f}× faster" if cmp_ else "–"
        summary.append(f"| {model} | {f'{max(cal):.2f}' if cal else 'failed'} | "
                       f"{peer_cell(bp)} | {tr} | {cs} | "
                       + " | ".join(calib_tables.summary_cells(res, model)) + " |")
    return "\n".join(body), "\n".join(summary)


def peer_cell(bp) -> str:
    """The best peer's metric, name, time and memory (main README summary)."""
    if bp is None:
        return "failed"
    value, label, r = bp
    return f"{value:.2f} ({label}; {r['wall_s']:.0f} s, {r['peak_rss_mb'] / 1024:.1f} GB)"


def replace_between(text: str, begin: str, end: str, content: str) -> str | None:
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        return None
    return text[: i + len(begin)] + "\n" + content.strip() + "\n" + text[j:]


def update_readmes(path: Path, readme: Path = BENCH / "README.md", main_readme: Path = REPO / "README.md") -> None:
    suite = path.stem.split("-", 1)[1]
    full, summary = render(path)
    # the main README's summary comes from the suite file covering the most models (full on a tie), so a
    # partial run of one suite does not replace a complete one
    candidates = [path] + [p for p in sorted(path.parent.glob("peers-*.jsonl")) if p != path]
    best = max(candidates, key=lambda p: (len({r["model"] for r in load(p)}), p.stem.endswith("full")))
    if best != path:
        summary = render(best)[1]
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    begin, end = f"<!-- peers:{suite}:begin -->", f"<!-- peers:{suite}:end -->"
    new = replace_between(text, begin, end, full)
    if new is None:
        new = text.rstrip() + f"\n\n## Peers: `{suite}` suite\n\n{begin}\n{full}\n{end}\n"
    tmp = readme.with_suffix(f".md.{os.getpid()}.tmp")
    tmp.write_text(new)
    tmp.replace(readme)
    if summary and main_readme.exists():
        t = main_readme.read_text()
        new_main = replace_between(t, "<!-- peers:begin -->", "<!-- peers:end -->", summary)
        if new_main is not None and new_main != t:
            tmp = main_readme.with_suffix(f".md.{os.getpid()}.tmp")
            tmp.write_text(new_main)
            tmp.replace(main_readme)
