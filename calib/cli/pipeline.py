"""``calib quantize``, ``calib run``, ``calib runs``, ``calib show``, ``calib diff``, ``calib demo``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from calib.cli._common import Progress, echo, is_quiet
from calib.config import DEFAULT_BATCH_SIZE
from calib.export.ort_bias import ort_bias_line
from calib.export.precision import resolve_target
from calib.export.trt_cache import DEFAULT_TRT_VERSION
from calib.errors import TargetNotMet
from calib.compare import parse_target
from calib.pipeline import quantize
from calib.config import DEPLOY_CPUS, keys_help, load_config
from calib.pipeline import execute, task_metrics
from calib.errors import ConfigError
from calib.runs import RunStore
from calib.rundiff import diff_runs
from calib.demo import run_demo
from calib.compare.report import CompareReport
from calib.cli._preprocess import preprocess_option, resolve_spec

__all__ = ["register"]

_QUANTIZE_EPILOG = """Examples:

  calib quantize model.onnx --data calib.npz -o model.int8.onnx

  calib quantize model.onnx --data images/ -o model.int8.onnx --method percentile:99.99 --cache model.cache

  calib quantize model.onnx --data calib/ --eval-data eval/ --method best --target top1:0.99 -o model.int8.onnx

Drop-in for onnxruntime.quantization.quantize_static (QDQ, per-channel, symmetric int8),
modelopt.onnx.quantization.quantize (int8) and Polygraphy's calibrators: same inputs (an FP32 ONNX
model and calibration data), a Q/DQ ONNX model out that TensorRT and ONNX Runtime both run.
Exit codes: 0 ok, 1 target not met (best model still written), 2 bad input.
"""

_RUN_EPILOG = """Examples:

  calib run calib.toml

  calib run calib.toml --store /data/calib-runs

  calib run --help-keys          (every config key, its type, default and meaning)
"""


def register(app: typer.Typer) -> None:
    app.command(name="quantize", epilog=_QUANTIZE_EPILOG)(quantize_cmd)
    app.command(name="run", epilog=_RUN_EPILOG)(run_cmd)
    app.command(name="runs", epilog="Example: calib runs --store calib-runs")(runs_cmd)
    app.command(name="show", epilog="Example: calib show 20261126-0315")(show_cmd)
    app.command(name="diff", epilog="Example: calib diff RUN_A RUN_B")(diff_cmd)
    app.command(name="demo", epilog="Example: calib demo   (builds the demo data, then one recorded run)")(demo_cmd)


def quantize_cmd(
    model: Path = typer.Argument(..., help="FP32 ONNX model (never modified)."),
    data: Path = typer.Option(..., "--data", "-d", help="Calibration data: .npz/.npy, image folder or manifest."),
    output: Path = typer.Option(..., "--output", "-o", help="Q/DQ ONNX model to write."),
    method: str = typer.Option("auto", "--method", "-m", help="auto (per tensor) | best | entropy | minmax | mse | "
                               "percentile[:P]."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Also write a TensorRT calibration cache."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the JSON scale report."),
    stats_out: Optional[Path] = typer.Option(None, "--stats-out", help="Also write the statistics (.npz) for "
                                             "'calib export/advise --stats' (no second collect)."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Evaluation data (for best/target)."),
    target: str = typer.Option("", "--target", help="e.g. cosine:0.99 or top1:0.99: keep nodes in float until met."),
    placement: Optional[str] = typer.Option(None, "--placement", help="trt (TensorRT's rules, default; fp16 "
                                            "remainder) or ort (ORT CPU fusions; fp32 remainder)."),
    target_runtime: Optional[str] = typer.Option(None, "--target-runtime", help="trt: TensorRT placement + fp16 "
                                                 "remainder; ort: ort placement + fp32 (see calib export)."),
    high_precision: Optional[str] = typer.Option(None, "--high-precision", help="fp16 | bf16 | fp32: dtype of "
                                                 "the non-INT8 remainder (default: fp16 for TensorRT, fp32 with ort)."),
    keep_fp32: List[str] = typer.Option([], "--keep-fp32", help="Node or op type kept FP32 in an fp16 remainder."),
    trt_version: int = typer.Option(DEFAULT_TRT_VERSION, "--trt-version", help="TensorRT version in the cache "
                                    "header (e.g. 100300 = 10.3.0)."),
    exclude: List[str] = typer.Option([], "--exclude", help="Node name, op type or tensor name to keep in float."),
    select_fraction: float = typer.Option(0.25, "--select-fraction", help="Share of the calibration samples (by "
                                          "sample id) that auto/best/advise choose on; figures use the rest or "
                                          "--eval-data."),
    max_float_nodes: int = typer.Option(0, "--max-float-nodes", help="With --target: give up after this many "
                                        "advise steps (0 = no limit); the best model so far is written."),
    time_budget: float = typer.Option(0.0, "--time-budget", min=0.0, help="Seconds for the whole run (0: 270 with --target, "
                                      "else none); the best model is written, the output says what was cut."),
    batch_size: int = typer.Option(DEFAULT_BATCH_SIZE, "--batch-size", "-b", help="Samples per ONNX Runtime run."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use at most this many calibration samples."),
    provider: List[str] = typer.Option(["cpu"], "--provider", help="ONNX Runtime execution provider(s)."),
    metric: str = typer.Option("", "--metric", help="Your metric as module:function (see README)."),
    bias_correction: bool = typer.Option(False, "--bias-correction", help="Correct each quantized layer's bias "
                                         "for the mean error INT8 adds (measured on the calibration data; with "
                                         "--eval-data kept only if it scores better)."),
    bias_samples: int = typer.Option(128, "--bias-samples", help="Calibration samples used by --bias-correction."),
    preprocess: Optional[Path] = preprocess_option(),
    deploy_cpu: str = typer.Option("", "--deploy-cpu", callback=lambda v: _deploy_cpu(v), help="ORT target's CPU: "
                                   "'' (this one, detected) | no-vnni (7-bit weights on every fused node) | vnni."),
) -> None:
    """One shot: the same plan as 'calib run' (collect, calibrate, choose, advise, transforms), to files."""
    parse_target(target) if target else None  # fail fast, before any work
    placement, dtype = resolve_target(target_runtime, placement, high_precision)
    spec = resolve_spec(model, data, preprocess)
    prog = Progress()
    try:
        res = quantize(model, data, output, method=method, cache=cache, report=report, eval_data=eval_data,
                       target=target, placement=placement, exclude=exclude, batch_size=batch_size, limit=limit,
                       providers=provider, metric=metric, bias_correction=bias_correction, bias_samples=bias_samples,
                       stats_out=stats_out, max_float_nodes=max_float_nodes, time_budget_s=time_budget, progress=prog,
                       high_precision=dtype, keep_fp32=keep_fp32, trt_version=trt_version, deploy_cpu=deploy_cpu,
                       select_fraction=select_fraction, preprocess=spec and spec.to_dict())
    except TargetNotMet as e:
        prog.close()
        print_quantized(e.result, target) if getattr(e, "result", None) is not None else None
        raise
    finally:
        prog.close()
    print_quantized(res, target)


def _deploy_cpu(value: str) -> str:
    if value not in DEPLOY_CPUS:
        raise typer.BadParameter(f"--deploy-cpu must be one of: no-vnni, vnni (or '' for this CPU), got {value!r}")
    return value


def print_quantized(res, target: str) -> None:
    """The shipped model's numbers first, then the path that got there, then the files."""
    if res.shipped:
        echo("shipped model: " + _metrics_line(res.shipped))
    if res.remainder:
        echo("  same, FP32 remainder: " + _metrics_line(res.remainder))
    echo(f"path: {res.path}")
    for t in res.transforms:
        d = t["selection_delta"]
        h = t["held_out_delta"]
        echo(f"  transform {t['name']}: {'kept' if t['kept'] else 'not kept'} ({len(t['nodes'])} node(s)"
             + (f"; {t['metric']} {d:+.3g} on selection" if d is not None else "")
             + (f", {h:+.3g} held out" if h is not None else "") + ")")
    if res.deployed is not None:
        echo(res.deployed["line"])
    if res.metrics:
        for label, task in res.metrics.items():
            echo(f"  {label:<12} " + _metrics_line(task))
        echo(f"best method on the evaluation data: {res.best}")
    if res.advice is not None:
        a = res.advice
        close = "" if a.met else f", {a.gap:.3g} short"
        echo(f"advise: {len(res.excluded)} node(s) in float, {target} met: {res.target_met} ({a.target.metric} "
             f"{a.metric:.4g} on the selection samples{close}; stopped: {a.stopped})")
    if res.budget_line:
        echo(res.budget_line)
    if res.ort_bias:  # the TensorRT model's biases ONNX Runtime's default optimisation overflows
        echo(ort_bias_line(res.ort_bias))
    if res.bias is not None:
        echo(f"bias correction: {res.bias['channels_corrected']} of {res.bias['channels']} channels in "
             f"{res.bias['nodes']} layer(s), measured on {res.bias['n_samples']} samples, "
             f"{'kept' if res.bias['kept'] else 'not kept'} ({res.bias['why']})")
    echo(f"method {res.method}, {res.stats.n_samples} samples -> {res.output}")
    for k, p in res.artifacts.items():
        if k != "model":
            echo(f"  {k}: {p}")


# the output metrics printed for a model (all of them are in the run's metrics / run.json)
KEY_METRICS = ("top1_agreement", "accuracy_int8", "accuracy_fp32", "output_cosine", "sqnr_db", "metric",
               "max_abs_error")


def _metrics_line(task: dict, sep: str = "  ") -> str:
    keys = [k for k in KEY_METRICS if k in task] or list(task)
    return sep.join(f"{k}={_fmt(task[k])}" for k in keys if isinstance(task[k], (int, float)))


def run_cmd(
    config: Optional[Path] = typer.Argument(None, help="Run configuration (TOML); see --help-keys."),
    store: Optional[Path] = typer.Option(None, "--store", help="Run store folder (overrides run.store)."),
    help_keys: bool = typer.Option(False, "--help-keys", help="List every config key and exit."),
) -> None:
    """Run a configuration file into a new run directory of the run store."""

    if help_keys:
        print(keys_help())
        return
    if config is None:

        raise ConfigError("missing CONFIG.toml", hint="see 'calib run --help-keys' and the README's example")
    cfg = load_config(config)
    if store is not None:
        cfg.store = store
    prog = Progress()
    try:
        run = execute(cfg, command=["calib", *sys.argv[1:]], progress=prog)
    except TargetNotMet as e:  # every artifact of the best model is written: say where, then exit 1
        prog.close()
        _print_run(e.run)
        raise
    finally:
        prog.close()
    _print_run(run)


# the shipped model's numbers, one per column of 'calib runs' (those no run has are left out)
RUN_COLUMNS = (("top1_agreement", "top-1"), ("accuracy_int8", "acc."), ("output_cosine", "cosine"),
               ("sqnr_db", "SQNR dB"), ("metric", "metric"), ("float_nodes", "float"), ("target_met", "met"))


def runs_cmd(store: Path = typer.Option(Path("calib-runs"), "--store", help="Run store folder.")) -> None:
    """List the runs of a store, newest first: the shipped model's numbers, then how it was made."""

    infos = RunStore(store).list()
    if not infos:
        echo(f"no runs in {store} (make one with 'calib demo' or 'calib run CONFIG.toml')")
        return
    cols = [(k, h) for k, h in RUN_COLUMNS if any(k in (i.metrics or {}) for i in infos)]
    t = Table(title=f"runs in {store}", box=box.SIMPLE_HEAD, pad_edge=False)
    # one cell per run: its id (kept whole), then status, model and the path to the shipped model
    t.add_column("run", overflow="fold", min_width=min(60, max(len(i.id) for i in infos)))
    for _, head in cols:
        t.add_column(head, justify="right", overflow="fold")
    for i in infos:
        met = i.metrics or {}
        about = f"{i.status} · {Path(i.model).name}" + (f" · {i.error[:80]}" if i.error else "")
        t.add_row(f"{i.id}\n{about}\n{met.get('path') or i.method}", *(_fmt(met.get(k, "")) for k, _ in cols),
                  end_section=True)
    _console().print(t)


def _console() -> Console:
    """A console as wide as the terminal (rich's own layout); 100 columns when not a terminal."""
    return Console(quiet=is_quiet(), width=None if sys.stdout.isatty() else 100)


def show_cmd(run: str = typer.Argument(..., help="Run id (or unique prefix) or run directory."),
             store: Path = typer.Option(Path("calib-runs"), "--store")) -> None:
    """Show one run: status, config, timings, metrics and artifacts."""

    _print_run(RunStore(store).get(run), full=True)


def diff_cmd(run_a: str = typer.Argument(...), run_b: str = typer.Argument(...),
             store: Path = typer.Option(Path("calib-runs"), "--store"),
             top: int = typer.Option(15, "--top", help="Tensors with the largest range change to list.")) -> None:
    """Compare two runs: metrics, excluded nodes and ranges side by side."""

    st = RunStore(store)
    d = diff_runs(st.get(run_a), st.get(run_b))
    con = _console()
    t = Table(title="metrics")
    t.add_column("metric")
    t.add_column(d.a_id)
    t.add_column(d.b_id)
    for k, (va, vb) in d.metrics.items():
        t.add_row(k, _fmt(va), _fmt(vb))
    con.print(t)
    con.print(f"float nodes only in {d.a_id}: {d.excluded_only_a or '-'}")
    con.print(f"float nodes only in {d.b_id}: {d.excluded_only_b or '-'}")
    t = Table(title=f"ranges ({d.method_a} vs {d.method_b}), largest relative change first")
    for col in ("tensor", "amax A", "amax B", "B/A"):
        t.add_column(col)
    for name, a, b in d.ranges[:top]:
        t.add_row(name, _fmt(a), _fmt(b), _fmt(b / a) if a and b else "-")
    con.print(t)
    con.print(f"{d.n_changed} of {d.n_common} common tensors changed amax; {len(d.only_a)} only in A, "
              f"{len(d.only_b)} only in B")


def demo_cmd(
    store: Path = typer.Option(Path("calib-runs"), "--store", help="Run store folder."),
    data_dir: Path = typer.Option(Path("datasets/build/doc_pages"), "--data-dir",
                                  help="Where the demo pages are built (reused if present)."),
    n_calib: int = typer.Option(256, "--n-calib", help="Calibration pages."),
    n_eval: int = typer.Option(192, "--n-eval", help="Evaluation pages."),
    target: str = typer.Option("top1:0.995", "--target", help="Target for advise."),
    quick: bool = typer.Option(False, "--quick", help="16 + 16 pages and two methods: checks an install in seconds."),
) -> None:
    """The whole loop on the bundled demo: data, collect, all methods, export, compare, advise, report."""

    prog = Progress()
    try:
        run = run_demo(store, data_dir, n_calib=n_calib, n_eval=n_eval, target=target, progress=prog,
                       command=["calib", *sys.argv[1:]], quick=quick)
    except TargetNotMet as e:  # the best model is written: show it, then exit 1
        prog.close()
        _print_summary(e.run)
        raise
    finally:
        prog.close()
    _print_summary(run)


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _print_summary(run) -> None:
    """The shipped model (the method + advise/bias correction) first, then each method alone."""
    m = run.manifest
    t = Table(title=f"calib demo: {Path(m['model']['path']).name}, {m.get('n_samples')} calibration samples")
    for col in ("model", "top-1 agreement", "accuracy INT8", "accuracy FP32", "output cosine", "worst layers"):
        t.add_column(col, overflow="fold")
    shipped = m.get("metrics") or {}
    t.add_row(f"{shipped.get('path') or m.get('method')} (shipped)", *_demo_cells(shipped),
              _worst(run, "compare"), style="bold")
    for label, task in (m.get("metrics_by_method") or _compared_methods(run)).items():
        t.add_row(label, *_demo_cells(task), _worst(run, f"compare:{label}"))
    _console().print(t)
    _print_run(run, full=False)


def _demo_cells(task: dict) -> list[str]:
    task = {"output_cosine": task.get("cosine"), **task}
    return [_fmt(task.get(k)) for k in ("top1_agreement", "accuracy_int8", "accuracy_fp32", "output_cosine")]


def _compared_methods(run) -> dict[str, dict]:
    """Each method's output metrics from its per-layer comparison on the evaluation data (``auto`` scores no
    whole-model method, so the run has no ``metrics_by_method``)."""
    out = {}
    for key in run.manifest.get("artifacts", {}):
        p = run.artifact(key) if key.startswith("compare:") else None
        if p is not None and p.exists():
            out[key.split(":", 1)[1]] = task_metrics(CompareReport.from_json(json.loads(p.read_text())))
    return out


def _worst(run, key: str) -> str:

    p = run.artifact(key)
    if p is None or not p.exists():
        return ""
    rep = CompareReport.from_json(json.loads(p.read_text()))
    return ", ".join(f"{r['node']} ({r['sqnr_db']:.1f} dB)" for r in rep.worst(3))


def _print_run(run, full: bool = False) -> None:
    """Status, the shipped model's numbers, the path that got there, then (full) provenance and files."""
    m = run.manifest
    echo(f"run {run.id}: {run.status}")
    if m.get("error"):
        echo(f"  error: {m['error']}")
    if m.get("outcome"):
        echo(f"  {m['outcome']}")
    met = dict(m.get("metrics", {}))
    path = met.pop("path", None)
    nums = {k: v for k, v in met.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in ("float_nodes", "advised_metric")}
    if nums:
        echo("  shipped model: " + (", ".join(f"{k}={_fmt(v)}" for k, v in nums.items()) if full
                                    else _metrics_line(nums, ", ")))
    if path:
        echo(f"  path: {path}")
    rest = {k: v for k, v in met.items() if k not in nums and k not in ("method", "transforms")}
    if rest:
        echo("  " + ", ".join(f"{k}={_fmt(v)}" for k, v in rest.items()))
    if full:
        echo(f"  model: {m.get('model', {}).get('path')} (sha256 {m.get('model', {}).get('sha256', '')[:12]}…)")
        echo(f"  data: {m.get('data', {}).get('path')}")
        echo(f"  command: {' '.join(m.get('command', []))}")
        echo("  versions: " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()))
        echo("  timings (s): " + ", ".join(f"{k} {v}" for k, v in m.get("timings_s", {}).items()))
    echo("  artifacts:")
    for key, name in m.get("artifacts", {}).items():
        echo(f"    {key:<22} {run.dir / name}")
