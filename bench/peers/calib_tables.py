"""Tables of calib's N = 128 jobs (``calib_jobs.py``) for ``table.render``: the default path against the
best TensorRT-valid peer and calib's best single method (with the transforms it tried), the ``--target``
path's time and memory, the ORT target under ONNX Runtime's optimisation vs the spec evaluation, the FP16 vs
FP32 remainder of the TensorRT target with the FP16 model's checks, and the memory bound of ``calib collect``. Every table is labelled with the commit, machine and
command of the records it reads (they may come from a later ``--append --jobs`` run than the rest).

Labelled classifiers: two models' accuracies on the same samples are compared by a paired test (the
evaluator's per-sample ``correct_bits``): the difference with its 95 % interval and the exact McNemar p-value
on the samples where exactly one of them is right. A default below a peer or single method by a difference that
test cannot tell from zero (p >= 0.05), while agreeing with FP32 at least as often or by a difference the
same test on ``agree_bits`` cannot tell from zero, is a *tie*, said so with the figures; a significant shortfall
is a miss.

Read tolerantly: a record without ``zero_points`` (older evaluator) counts as a symmetric peer, flagged;
``transforms`` is a list of names or of ``{name, kept, metric, selection_delta, held_out_delta, ...}`` objects,
or missing; ``check`` (the FP16 job's ``tools/fp16_check.py`` facts) may be missing.
"""

from __future__ import annotations

import base64
from math import comb, sqrt

N = 128
TARGET_S, TARGET_MB = 300.0, 4096.0
ORT_GAP, FP16_GAP = 0.5, 0.2
EPS = 1e-9  # metrics are means of 0/1 per sample in float: 85.6 - 85.4 is 0.2000000000000028
SINGLE = ["export:minmax", "export:percentile", "export:entropy", "export:mse"]
METHODS = ["quantize:method:minmax", "quantize:method:percentile", "quantize:method:entropy", "quantize:method:mse"]
DEFAULT, TARGET, ORT, FP16, FP32 = ("quantize:default", "quantize:target:cosine:0.99", "quantize:ort",
                                    "quantize:trt-fp16", "quantize:trt-fp32")
BOUNDED, UNBOUNDED = "collect:max-memory", "collect:unbounded"
OURS = (DEFAULT, TARGET, ORT, FP16, FP32, BOUNDED, UNBOUNDED, *METHODS)


def ok(r: dict | None) -> bool:
    return bool(r) and r["status"] == "ok"


def primary(r: dict | None, key: str = "metrics") -> float | None:
    return r[key]["primary"] if ok(r) and key in r else None


def f2(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def trt_valid(m: dict) -> bool | None:
    """Every zero point 0 and signed: int8 (activations, weights) or int32 (ONNX Runtime's quantized biases);
    uint8 (NNCF's unsigned activations) is not TensorRT's symmetric int8. None: the record predates the check."""
    zp = m.get("zero_points")
    if zp is None:
        return None
    return bool(zp["all_zero"]) and set(zp["dtypes"]) <= {"int8", "int32"}


def ref_size(res, model) -> int | None:
    """The suite's calibration size nearest N at which peers ran (N itself since the quick suite runs at N)."""
    ns = (sorted({n for t in ("ort", "modelopt", "nncf") for n in res.sizes(model, t)})
          or res.sizes(model, "calib", "export:entropy"))
    return min(ns, key=lambda n: (abs(n - N), n)) if ns else None


def correct(r: dict | None, key: str = "correct_bits") -> tuple[int, int] | None:
    """(bits as one integer, sample count) of which evaluation samples the model got right (``agree_bits``:
    agreed with FP32's top-1), if recorded."""
    m = (r or {}).get("metrics") or {}
    if key not in m or "eval_samples" not in m:
        return None
    return int.from_bytes(base64.b64decode(m[key]), "big"), m["eval_samples"]


def mcnemar(ours: tuple[int, int], theirs: tuple[int, int]) -> tuple[int, int, float, float, float] | None:
    """Paired comparison of two models on the same samples: (b, c, difference in points, its 95 % half-width,
    exact McNemar p), b = samples only ours got right, c = only theirs; None if the sample sets differ."""
    (x, n), (y, k) = ours, theirs
    if n != k or not n:
        return None
    b, c = (x & ~y).bit_count(), (y & ~x).bit_count()
    d = (b - c) / n
    half = 1.96 * sqrt(max((b + c) / n - d * d, 0.0) / n)
    p = min(1.0, 2 * sum(comb(b + c, i) for i in range(min(b, c) + 1)) / 2 ** (b + c)) if b + c else 1.0
    return b, c, d * 100, half * 100, p


def compare_cell(r: dict, other: dict | None, name: str, value: float) -> tuple[str, bool]:
    """How the default stands against one model: ("", True) at or above it; a tie (not significant, at least
    as close to FP32) or a miss, said with the paired figures. Returns (text, counts as met)."""
    d = primary(r)
    if d >= value - EPS:
        return "", True
    test = mcnemar(correct(r), correct(other)) if correct(r) and correct(other) else None
    agree = lambda x: (x or {}).get("metrics", {}).get("top1_agreement")  # noqa: E731
    if test:
        b, c, diff, half, p = test
        closer = (agree(r) or 0) >= (agree(other) or 0) - EPS
        at = mcnemar(correct(r, "agree_bits"), correct(other, "agree_bits")) \
            if correct(r, "agree_bits") and correct(other, "agree_bits") else None
        fig = (f"{diff:+.2f} ± {half:.2f} pts vs {name} ({c - b} of {correct(r)[1]:,} samples, McNemar p = {p:.2f}; "
               f"agreement with FP32 {agree(r):.2f} vs {agree(other):.2f} %"
               + ("" if closer or at is None else f", p = {at[4]:.2f}") + ")")
        if p >= 0.05 and (closer or (at is not None and at[4] >= 0.05)):
            return f"tie: {fig}", True
        return f"**no**: {fig}", False
    return f"**no**: below {name} {value:.2f}", False


def best_symmetric_peer(res, model, n, peer_cols, label) -> tuple[float, str] | None:
    best = None
    for t, v in peer_cols:
        r = res.get(model, t, v, n)
        if not ok(r) or "metrics" not in r:
            continue
        valid = trt_valid(r["metrics"])
        if valid is False:
            continue
        cand = (r["metrics"]["primary"], label[(t, v)] + ("" if valid else " (zero points not checked)"), r)
        best = cand if best is None or cand[0] > best[0] else best
    return best


def best_single(res, model, n) -> tuple[float, str, int, dict] | None:
    """calib's best single method: the ``methods`` job's (N = 128, same code as the default job) when it ran,
    else the suite's ``export:X`` jobs at ``n``. ``(value, method, N, record)``."""
    for variants, size in ((METHODS, N), (SINGLE, n)):
        if size is None:
            continue
        cands = [(primary(res.get(model, "calib", v, size)), v.rsplit(":", 1)[1], size, res.get(model, "calib", v, size))
                 for v in variants]
        cands = [c for c in cands if c[0] is not None]
        if cands:
            return max(cands, key=lambda c: c[0])
    return None


def num(x) -> bool:
    return isinstance(x, (int, float)) and x == x


def transform_cell(x: dict | str) -> str:
    """One transform: kept or not, and what it gave (with minus without) held out, beside the selection figure
    that decided it: ``equalize: not kept, held out sqnr_db -1.01 (selection -2.60)``."""
    if isinstance(x, str):
        return x
    s = f"{x.get('name', '?')}: " + ("kept" if x.get("kept", True) else "not kept")
    if x.get("nodes") == 0:
        return s + " (no node to change)"
    d, sel, metric = x.get("held_out_delta"), x.get("selection_delta"), x.get("metric", "")
    if num(d):
        where = " (report split)" if x.get("held_out_in_sample") else ""
        s += f", held out{where} {metric + ' ' if metric else ''}{d:+.2f}"
    elif "held_out_delta" in x:
        s += ", held out: not measured"
    return s + (f" (selection {sel:+.2f})" if num(sel) else "")


def transforms_cell(r: dict) -> str:
    t = r.get("transforms")
    if t is None:
        return "not reported"
    return "; ".join(transform_cell(x) for x in t) if t else "none"


def head(title: str, intro: str, cols: list[str]) -> list[str]:
    """A table's heading, its one-paragraph description and its header rows."""
    return [f"#### {title}", "", intro, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def jobs_label(res) -> list[str]:
    recs = [r for r in res.recs if r["variant"] in OURS]
    if not recs:
        return []
    commits = sorted({r.get("commit", "?") for r in recs})
    cmds = sorted({r.get("command", "?") for r in recs})
    m = recs[-1]["machine"]
    return [f"Jobs at N = {N} calibration samples ({recs[0]['time']} … {recs[-1]['time']}); commit "
            f"{', '.join(commits)}; machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB; command: "
            + ", ".join(f"`{c}`" for c in cmds) + ".", ""]


def default_table(res, notes, peer_cols, lab) -> list[str]:
    out = head("calib's default path: `calib quantize MODEL --data calib_128.npz -o OUT` (no other option)",
               "Held out: the suite's evaluation samples, which no job sees (calib chooses on ~25 % of its 128 "
               "calibration samples). Peers and calib's single methods (`--method X`, same code) at the same N; "
               "a peer counts only with every zero point 0 and signed (int8; int32 for ORT's biases), TensorRT's symmetric "
               "int8: NNCF's uint8 activations do not. Time (s, wall) and peak memory (MB, process tree) of the default "
               "job and of the best peer's job beside it. On labelled classifiers a shortfall is tested on the same "
               "samples (difference with its 95 % interval, exact McNemar p; agreement with FP32 beside): *tie* = "
               "not significant (p ≥ 0.05) and calib at least as close to FP32, or less close by a difference the "
               "same test on agreement cannot tell from zero either. Transforms: each one the default path "
               "tried (from its scale report, `--report`), kept or not, and what it gave, with minus without, on data "
               "not used to choose: the evaluation data, or calib's report split of the calibration samples where "
               "marked; in parentheses the selection-split figure that decided it.",
               ["model", "calib default", "best symmetric peer", "best single method", "≥ peer and ≥ single?", "s",
                "MB", "peer s", "peer MB", "transforms"])
    for model in res.models:
        r = res.get(model, "calib", DEFAULT, N)
        if r is None:
            continue
        n = ref_size(res, model)
        d = primary(r)
        bp = best_symmetric_peer(res, model, n, peer_cols, lab) if n else None
        bs = best_single(res, model, n)
        if d is None:
            verdict = "**failed¹**"
        elif bp is None and bs is None:
            verdict = "n/a (no peer or single-method result)"
        else:
            said = [compare_cell(r, x[-1], x[1], x[0]) for x in (bp, bs) if x]
            said = [t for t in said if t[0]]
            verdict = "; ".join(t for t, _ in said) if said else "yes"
            if all(met for _, met in said) and said:
                verdict = "yes (" + verdict + ")"
            for t, met in said:
                if not met:
                    notes.append(f"{model}: calib default {d:.2f} {t.removeprefix('**no**: ')} (N={n}).")
        pr = bp[-1] if bp else None
        cells = [f2(d), f"{f2(bp[0])} ({bp[1]}, N={n})" if bp else "–",
                 f"{f2(bs[0])} ({bs[1]}, N={bs[2]})" if bs else "–", verdict,
                 f"{r['wall_s']:.1f}" if ok(r) else "–", f"{r['peak_rss_mb']:.0f}" if ok(r) else "–",
                 f"{pr['wall_s']:.1f}" if ok(pr) else "–", f"{pr['peak_rss_mb']:.0f}" if ok(pr) else "–",
                 transforms_cell(r) if ok(r) else "–"]
        out.append(f"| {model} | " + " | ".join(cells) + " |")
    return out


def target_table(res, notes) -> list[str]:
    out = head("`--target cosine:0.99` (no `--eval-data`): time, memory, met or how close",
               f"Goal: within {TARGET_S / 60:.0f} min on 2 cores and under {TARGET_MB / 1024:.0f} GB peak (job limit "
               "6 min). Exit 1 = target not met: calib still writes its best model, scored here. CPU s (user + "
               "system, process tree) and the 1-minute load average before the job show how busy the machine was.",
               ["model", "s", "CPU s", "load", "MB", "met?", "calib's figure (its report split)", "float nodes",
                "held-out", "default", "goal"])
    for model in res.models:
        r = res.get(model, "calib", TARGET, N)
        if r is None:
            continue
        if not ok(r):
            out.append(f"| {model} | – | – | – | – | failed¹ | – | – | – | – | **missed** |")
            notes.append(f"{model}: --target {TARGET.split(':', 2)[2]} failed: {r.get('error', '?')[:120]}")
            continue
        met = "yes" if r.get("target_met") else "no"
        close = r.get("target_error") or r.get("advise_says") or r.get("calib_says") or ""
        m = r["metrics"]
        fast, small = r["wall_s"] <= TARGET_S, r["peak_rss_mb"] < TARGET_MB
        goal = "met" if fast and small else "**missed**"
        if not (fast and small):
            notes.append(f"{model}: --target took {r['wall_s']:.0f} s, {r['peak_rss_mb']:.0f} MB (goal ≤ {TARGET_S:.0f} s, < {TARGET_MB:.0f} MB).")
        close = close.replace("|", "\\|")[:160]
        cpu, load = r.get("cpu_s"), r.get("loadavg_1m_before")
        out.append(f"| {model} | {r['wall_s']:.1f} | {'–' if cpu is None else f'{cpu:.0f}'} | "
                   f"{'–' if load is None else f'{load:.1f}'} | {r['peak_rss_mb']:.0f} | {met} | {close} | "
                   f"{m.get('float_nodes', '?')} | {f2(m['primary'])} | {f2(primary(res.get(model, 'calib', DEFAULT, N)))} | {goal} |")
    return out


def runtime_table(res, notes) -> list[str]:
    out = head("ORT target: ONNX Runtime's optimisation vs the spec evaluation",
               "`--target-runtime ort`, one model scored under ONNX Runtime's default optimisation "
               "(ORT_ENABLE_ALL, only the real outputs: what a user gets on this CPU) and by the spec evaluation "
               f"(ORT_DISABLE_ALL, Q/DQ as ONNX defines them); goal: gap ≤ {ORT_GAP} points.",
               ["model", "optimised", "spec", "gap (pts)", "goal"])
    for model in res.models:
        ro = res.get(model, "calib", ORT, N)
        if ro is None:
            continue
        opt, spec = primary(ro), primary(ro, "metrics_spec")
        cells = [f2(opt) if ok(ro) else "failed¹", f2(spec) if ok(ro) else "failed¹"]
        if opt is not None and spec is not None:
            gap = abs(opt - spec)
            cells += [f"{gap:.2f}", "met" if gap <= ORT_GAP + EPS else "**missed**"]
            if gap > ORT_GAP + EPS:
                notes.append(f"{model}: ORT target scores {opt:.2f} optimised vs {spec:.2f} spec (gap ≤ {ORT_GAP}).")
        else:
            cells += ["–", "**missed** (failed¹)"]
        out.append(f"| {model} | " + " | ".join(cells) + " |")
    return out


def flips_cell(c: dict) -> str:
    """Samples whose top-1 differs between the two remainders, with the FP32-remainder model's top-2 margin."""
    f = c.get("flips")
    if not f:
        return "–"
    ms = ", ".join(f"#{x['sample']} {x['fp32_rem_margin']:.3f}" for x in f["samples"])
    return (f"{f['n']} of {f['of']}" + (f" ({ms}; median {f['median_margin']:.2f})" if f["n"] else "")
            + f"; agree with FP32: {f['fp16_agrees_fp32']} vs {f['fp32_rem_agrees_fp32']}")


def check_cells(c: dict | None) -> tuple[list[str], bool]:
    """The FP16 model's structural checks (``tools/fp16_check.py``) as cells, and whether all passed."""
    if not c or "error" in c:
        return ["not run" if not c else "check failed: " + c["error"][:80].replace("|", "\\|")] + ["–"] * 5, False
    fp32 = c.get("fp32_compute", [])
    fp32_cell = "none" if not fp32 else f"**{len(fp32)}**: " + ", ".join(fp32[:3]) + (" …" if len(fp32) > 3 else "")
    undoc = c.get("undocumented", {})
    kept = f"{c.get('kept_fp32', 0)}" + (f" (**{len(undoc)} undocumented**)" if undoc else "")
    io = "yes" if c.get("io_kept") else "**no**: " + "; ".join(c.get("io_diff", []))[:80]
    good = c.get("checker") == "ok" and c.get("ort_cpu") == "ok" and bool(c.get("io_kept")) and not fp32 and not undoc
    return [c.get("checker", "?")[:80], c.get("ort_cpu", "?")[:80], io, kept, fp32_cell, flips_cell(c)], good


def fp16_table(res, notes) -> list[str]:
    out = head("TensorRT target: FP16 vs FP32 remainder, and the FP16 model's checks (issue 17)",
               "`--target-runtime trt --high-precision fp16` vs `... fp32`, both scored by the spec evaluation on "
               f"the model's whole evaluation set; goal: the FP16 remainder loses ≤ {FP16_GAP} points and the model "
               "passes `onnx.checker` (full check), runs on ONNX Runtime CPU (default optimisation), keeps the FP32 "
               "model's input/output names and dtypes, and has no FP32 compute node outside calib's keep-FP32 list "
               "(each listed node's reason one of the documented rules); `tools/fp16_check.py`. Top-1 flips "
               "(classifiers): samples whose class differs between the two remainders, with the FP32-remainder "
               "model's top-2 logit margin, and how many samples each model agrees with the FP32 model on.",
               ["model", "samples", "fp16 remainder", "fp32 remainder", "fp32 − fp16 (pts)", "onnx.checker", "ORT CPU",
                "I/O kept", "kept FP32", "FP32 compute outside the list", "top-1 flips", "goal"])
    for model in res.models:
        r16, r32 = (res.get(model, "calib", v, N) for v in (FP16, FP32))
        if r16 is None and r32 is None:
            continue
        a, b = primary(r16), primary(r32)
        n = (r16 or {}).get("metrics", {}).get("eval_samples", "?")
        cells = [str(n), f2(a) if r16 is None or ok(r16) else "failed¹", f2(b) if r32 is None or ok(r32) else "failed¹"]
        checks, good = check_cells(r16.get("check") if ok(r16) else None)
        if a is not None and b is not None:
            cells.append(f"{b - a:+.2f}")
            close = b - a <= FP16_GAP + EPS
            verdict = "met" if close and good else "**missed**" + ("" if close else " (gap)") + ("" if good else " (checks)")
            if not close:
                notes.append(f"{model}: TensorRT target loses {b - a:.2f} points with an FP16 remainder (goal ≤ {FP16_GAP}).")
        else:
            cells.append("–")
            verdict = "**missed** (failed¹)"
        out.append(f"| {model} | " + " | ".join(cells + checks + [verdict]) + " |")
    return out


def memory_table(res, notes) -> list[str]:
    out = head("`calib collect --max-memory` (bound forcing grouping) vs no bound",
               "The bound (`tools/calib_groups.py`) is planned with calib's own memory model: never below the "
               "minimum calib accepts (batch 1, one tensor per pass; less is refused with exit 2) plus 32 MB, and "
               "below the cost of one pass at the run's batch size, so that collection must adapt: several passes, or "
               "fewer at a smaller batch size, which calib prefers (then 1 group here); 1 GiB where calib adapts "
               "there, else the largest such bound. Where one pass already fits under that minimum, nothing can be "
               "forced (groups n/a, the bound is the minimum). Peak RSS is the whole process tree "
               "(Python, ONNX Runtime and all); a peak over the bound is a fault of calib's memory model.",
               ["model", "bound MB", "minimum MB", "one pass MB", "groups", "peak MB", "peak / bound", "under?",
                "s", "no bound: peak MB", "s"])
    for model in res.models:
        rb, ru = res.get(model, "calib", BOUNDED, N), res.get(model, "calib", UNBOUNDED, N)
        if rb is None and ru is None:
            continue
        plan = (rb or {}).get("plan", {})
        est = [str(plan.get("minimum_mb", "?")), str(plan.get("one_pass_mb", "?"))]
        if ok(rb):
            bound = int(rb["max_memory"]) / 2**20
            ratio = rb["peak_rss_mb"] / bound
            under = "yes" if ratio <= 1 else "**no**"
            if ratio > 1:
                notes.append(f"{model}: collect --max-memory {bound:.0f} MB peaked at {rb['peak_rss_mb']:.0f} MB.")
            groups = str(rb.get("groups", "?"))
            if plan.get("forced") is False:
                groups += " (n/a)"
                notes.append(f"{model}: grouping cannot be forced: {plan.get('reason', '')}.")
            cells = [f"{bound:.0f}", *est, groups, f"{rb['peak_rss_mb']:.0f}", f"{ratio:.2f}", under,
                     f"{rb['wall_s']:.1f}"]
        else:
            cells = ["–", *est, "–", "failed¹" if rb else "–", "–", "–", "–"]
        cells += [f"{ru['peak_rss_mb']:.0f}", f"{ru['wall_s']:.1f}"] if ok(ru) else ["failed¹" if ru else "–", "–"]
        out.append(f"| {model} | " + " | ".join(cells) + " |")
    return out


def section(res, notes: list[str], peer_cols, lab) -> list[str]:
    """The calib-jobs tables, or nothing when the results file has none of their records."""
    head = jobs_label(res)
    if not head:
        return []
    return (["### calib's default, `--target`, runtime-target and memory-bound paths", ""] + head
            + default_table(res, notes, peer_cols, lab) + [""] + target_table(res, notes) + [""]
            + runtime_table(res, notes) + [""] + fp16_table(res, notes) + [""] + memory_table(res, notes))


def summary_cells(res, model) -> list[str]:
    """For the main README: calib default (N=128) with its time and memory, and the --target job's."""
    d = res.get(model, "calib", DEFAULT, N)
    t = res.get(model, "calib", TARGET, N)
    tc = "–"
    if ok(t):
        tc = f"{t['wall_s']:.0f} s, {t['peak_rss_mb'] / 1024:.1f} GB, " + ("met" if t.get("target_met") else "not met")
    elif t is not None:
        tc = "failed"
    dc = "failed" if d is not None and not ok(d) else f2(primary(d))
    if ok(d):
        dc += f" ({d['wall_s']:.0f} s, {d['peak_rss_mb'] / 1024:.1f} GB)"
    return [dc, tc]
