"""Tables of calib's N = 128 jobs (``calib_jobs.py``) for ``table.render``: the default path against the
best TensorRT-valid peer and calib's best single method, the ``--target`` path's time and memory, the ORT
target under ONNX Runtime's optimisation vs the spec evaluation, the FP16 vs FP32 remainder of the TensorRT
target, and the memory bound of ``calib collect``. Every table is labelled with the commit, machine and
command of the records it reads (they may come from a later ``--append --jobs`` run than the rest).

Read tolerantly: a record without ``zero_points`` (older evaluator) counts as a symmetric peer, flagged;
``transforms`` is a list of names or of ``{name, kept, held_out_delta}`` objects, or missing.
"""

from __future__ import annotations

N = 128
TARGET_S, TARGET_MB = 300.0, 4096.0
ORT_GAP, FP16_GAP = 0.5, 0.2
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
    """The suite's calibration size nearest N at which peers ran (ORT's histogram calibrators need batches
    of 20, so 128 itself is not a peer size)."""
    ns = res.sizes(model, "ort", "minmax") or res.sizes(model, "calib", "export:entropy")
    return min(ns, key=lambda n: (abs(n - N), n)) if ns else None


def best_symmetric_peer(res, model, n, peer_cols, label) -> tuple[float, str] | None:
    best = None
    for t, v in peer_cols:
        r = res.get(model, t, v, n)
        if not ok(r) or "metrics" not in r:
            continue
        valid = trt_valid(r["metrics"])
        if valid is False:
            continue
        cand = (r["metrics"]["primary"], label[(t, v)] + ("" if valid else " (zero points not checked)"))
        best = cand if best is None or cand[0] > best[0] else best
    return best


def best_single(res, model, n) -> tuple[float, str, int] | None:
    """calib's best single method: the ``methods`` job's (N = 128, same code as the default job) when it ran,
    else the suite's ``export:X`` jobs at ``n``. ``(value, method, N)``."""
    for variants, size in ((METHODS, N), (SINGLE, n)):
        if size is None:
            continue
        cands = [(primary(res.get(model, "calib", v, size)), v.rsplit(":", 1)[1], size) for v in variants]
        cands = [c for c in cands if c[0] is not None]
        if cands:
            return max(cands)
    return None


def transforms_cell(r: dict) -> str:
    t = r.get("transforms")
    if t is None:
        return "not reported"
    if not t:
        return "none"
    cells = []
    for x in t:
        if isinstance(x, str):
            cells.append(x)
            continue
        s = str(x.get("name", "?")) + ("" if x.get("kept", True) else " (not kept)")
        d = x.get("held_out_delta")
        cells.append(s + (f" ({d:+.2f})" if isinstance(d, (int, float)) else ""))
    return "; ".join(cells)


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
               "calibration samples). Peers and calib's single methods at the suite's size nearest 128 (N below); "
               "calib's single methods from the `methods` job (N = 128, `--method X`, same code) where it ran; "
               "a peer counts only with every zero point 0 and signed (int8; int32 for ORT's biases), TensorRT's symmetric "
               "int8: NNCF's uint8 activations do not. Transforms: what the "
               "default path applied, as calib reports it (its own figure on its report split, where given).",
               ["model", "calib default", "best symmetric peer", "best single method", "≥ peer and ≥ single?", "s",
                "MB", "transforms"])
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
            lost = [f"{x[1]} {x[0]:.2f}" for x in (bp, bs) if x and d < x[0] - 1e-9]
            verdict = "yes" if not lost else "**no**: below " + ", ".join(lost)
            if lost:
                notes.append(f"{model}: calib default {d:.2f} below " + ", ".join(lost) + f" (N={n}).")
        cells = [f2(d), f"{f2(bp[0])} ({bp[1]}, N={n})" if bp else "–",
                 f"{f2(bs[0])} ({bs[1]}, N={bs[2]})" if bs else "–", verdict,
                 f"{r['wall_s']:.1f}" if ok(r) else "–", f"{r['peak_rss_mb']:.0f}" if ok(r) else "–",
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
    out = head("Runtime targets: ORT (optimised vs spec) and TensorRT (FP16 vs FP32 remainder)",
               "ORT target: `--target-runtime ort`, one model scored under ONNX Runtime's default optimisation "
               "(ORT_ENABLE_ALL, only the real outputs: what a user gets on this CPU) and by the spec evaluation "
               f"(ORT_DISABLE_ALL, Q/DQ as ONNX defines them); goal: gap ≤ {ORT_GAP} points. TensorRT target: "
               "`--target-runtime trt --high-precision fp16` vs `... fp32`, both by the spec evaluation; "
               f"goal: the FP16 remainder loses ≤ {FP16_GAP} points.",
               ["model", "ORT target, optimised", "ORT target, spec", "gap (pts)", "goal", "TRT fp16 remainder",
                "TRT fp32 remainder", "fp32 − fp16 (pts)", "goal"])
    for model in res.models:
        ro, r16, r32 = (res.get(model, "calib", v, N) for v in (ORT, FP16, FP32))
        if ro is None and r16 is None and r32 is None:
            continue
        opt, spec = primary(ro), primary(ro, "metrics_spec")
        a, b = primary(r16), primary(r32)
        cells = [f2(opt) if ro is None or ok(ro) else "failed¹", f2(spec) if ro is None or ok(ro) else "failed¹"]
        if opt is not None and spec is not None:
            gap = abs(opt - spec)
            cells += [f"{gap:.2f}", "met" if gap <= ORT_GAP else "**missed**"]
            if gap > ORT_GAP:
                notes.append(f"{model}: ORT target scores {opt:.2f} optimised vs {spec:.2f} spec (gap ≤ {ORT_GAP}).")
        else:
            cells += ["–", "**missed** (failed¹)" if ro is not None else ""]
        cells += [f2(a) if r16 is None or ok(r16) else "failed¹", f2(b) if r32 is None or ok(r32) else "failed¹"]
        if a is not None and b is not None:
            cells += [f"{b - a:+.2f}", "met" if b - a <= FP16_GAP else "**missed**"]
            if b - a > FP16_GAP:
                notes.append(f"{model}: TensorRT target loses {b - a:.2f} points with an FP16 remainder (goal ≤ {FP16_GAP}).")
        else:
            cells += ["–", "**missed** (failed¹)" if r16 is not None or r32 is not None else ""]
        out.append(f"| {model} | " + " | ".join(cells) + " |")
    return out


def memory_table(res, notes) -> list[str]:
    out = head("`calib collect --max-memory` (bound forcing grouping) vs no bound",
               "The bound (1 GiB, or calib's own baseline plus half its one-pass estimate where one pass fits in "
               "1 GiB, `tools/calib_groups.py`) is what calib budgets for the model and the exposed activations; peak "
               "RSS is the whole process tree (Python, ONNX Runtime and its arena included). Where forcing groups needs "
               "a bound below what the process takes without any exposed activations (the no-bound peak less the "
               "one-pass estimate), the verdict is n/a; the saving shows as the difference of the two peaks.",
               ["model", "bound MB", "groups", "one-pass estimate MB", "peak MB", "peak / bound", "under?", "s",
                "no bound: peak MB", "s"])
    for model in res.models:
        rb, ru = res.get(model, "calib", BOUNDED, N), res.get(model, "calib", UNBOUNDED, N)
        if rb is None and ru is None:
            continue
        plan = (rb or {}).get("plan", {})
        # what the process needs besides the exposed activations: the unbounded peak less calib's one-pass estimate
        floor = ru["peak_rss_mb"] - plan["one_pass_mb"] if ok(ru) and "one_pass_mb" in plan else None
        if ok(rb):
            bound = int(rb["max_memory"]) / 2**20
            ratio = rb["peak_rss_mb"] / bound
            under = "yes" if ratio <= 1 else "**no**"
            if ratio > 1 and floor is not None and bound < floor:
                under = f"n/a: bound < the process's own ~{floor:.0f} MB"
            elif ratio > 1:
                notes.append(f"{model}: collect --max-memory {bound:.0f} MB peaked at {rb['peak_rss_mb']:.0f} MB.")
            cells = [f"{bound:.0f}", str(rb.get("groups", "?")), str(plan.get("one_pass_mb", "?")),
                     f"{rb['peak_rss_mb']:.0f}", f"{ratio:.2f}", under, f"{rb['wall_s']:.1f}"]
        else:
            cells = ["–", "–", str(plan.get("one_pass_mb", "?")), "failed¹" if rb else "–", "–", "–", "–"]
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
            + runtime_table(res, notes) + [""] + memory_table(res, notes))


def summary_cells(res, model) -> list[str]:
    """For the main README: calib default (N=128) and the --target job's time."""
    d = res.get(model, "calib", DEFAULT, N)
    t = res.get(model, "calib", TARGET, N)
    tc = "–"
    if ok(t):
        tc = f"{t['wall_s']:.0f} s, {t['peak_rss_mb'] / 1024:.1f} GB, " + ("met" if t.get("target_met") else "not met")
    elif t is not None:
        tc = "failed"
    return [f2(primary(d)) if d is None or ok(d) else "failed", tc]
