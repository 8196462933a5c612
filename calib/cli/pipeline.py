"""``calib quantize``, ``calib run``, ``calib runs``, ``calib show``, ``calib diff``, ``calib demo``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from calib.cli._common import Progress, echo, is_quiet
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
    method: str = typer.Option("entropy", "--method", "-m",
                               help="entropy | minmax | percentile[:P] | mse | best (needs --eval-data)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Also write a TensorRT calibration cache."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the JSON scale report."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Evaluation data (for best/target)."),
    target: str = typer.Option("", "--target", help="e.g. cosine:0.99 or top1:0.99: keep nodes in float until met."),
    placement: str = typer.Option("trt", "--placement", help="trt (TensorRT's rules) or ort (ORT CPU fusions)."),
    exclude: List[str] = typer.Option([], "--exclude", help="Node name, op type or tensor name to keep in float."),
    batch_size: int = typer.Option(8, "--batch-size", "-b"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use at most this many calibration samples."),
    provider: List[str] = typer.Option(["cpu"], "--provider", help="ONNX Runtime execution provider(s)."),
    metric: str = typer.Option("", "--metric", help="Your metric as module:function (see README)."),
    bias_correction: bool = typer.Option(False, "--bias-correction", help="Correct each quantized layer's bias "
                                         "for the mean error INT8 adds (measured on the calibration data; with "
                                         "--eval-data kept only if it scores at least as well)."),
    bias_samples: int = typer.Option(128, "--bias-samples", help="Calibration samples used by --bias-correction."),
    preprocess: Optional[Path] = preprocess_option(),
) -> None:
    """One shot: collect, calibrate, export (and with --target: compare and advise)."""
    from calib.compare import parse_target
    from calib.pipeline import quantize

    if target:
        parse_target(target)
    spec = resolve_spec(model, data, preprocess)
    prog = Progress()
    try:
        res = quantize(model, data, output, method=method, cache=cache, report=report, eval_data=eval_data,
                       target=target, placement=placement, exclude=exclude, batch_size=batch_size, limit=limit,
                       providers=provider, metric=metric, bias_correction=bias_correction,
                       bias_samples=bias_samples, progress=prog,
                       preprocess=spec.to_dict() if spec is not None else None)
    finally:
        prog.close()
    if res.metrics:
        for label, task in res.metrics.items():
            echo(f"  {label:<12} " + "  ".join(f"{k}={_fmt(v)}" for k, v in task.items()
                                                if isinstance(v, (int, float))))
        echo(f"best method on the evaluation data: {res.best}")
    if res.advice is not None:
        echo(f"advise: {len(res.excluded)} node(s) in float, {target} met: {res.target_met}")
    if res.bias is not None:
        echo(f"bias correction: {res.bias['channels_corrected']} of {res.bias['channels']} channels in "
             f"{res.bias['nodes']} layer(s), measured on {res.bias['n_samples']} samples, "
             f"{'kept' if res.bias['kept'] else 'not kept'} ({res.bias['why']})")
    echo(f"method {res.method}, {res.stats.n_samples} samples -> {output}")
    for k, p in res.artifacts.items():
        if k != "model":
            echo(f"  {k}: {p}")


def run_cmd(
    config: Optional[Path] = typer.Argument(None, help="Run configuration (TOML); see --help-keys."),
    store: Optional[Path] = typer.Option(None, "--store", help="Run store folder (overrides run.store)."),
    help_keys: bool = typer.Option(False, "--help-keys", help="List every config key and exit."),
) -> None:
    """Run a configuration file into a new run directory of the run store."""
    from calib.config import keys_help, load_config
    from calib.pipeline import execute

    if help_keys:
        print(keys_help())
        return
    if config is None:
        from calib.errors import ConfigError

        raise ConfigError("missing CONFIG.toml", hint="see 'calib run --help-keys' and the README's example")
    cfg = load_config(config)
    if store is not None:
        cfg.store = store
    prog = Progress()
    try:
        run = execute(cfg, command=["calib", *sys.argv[1:]], progress=prog)
    finally:
        prog.close()
    _print_run(run)


def runs_cmd(store: Path = typer.Option(Path("calib-runs"), "--store", help="Run store folder.")) -> None:
    """List the runs of a store, newest first, with their key metrics."""
    from rich.console import Console
    from rich.table import Table

    from calib.runs import RunStore

    infos = RunStore(store).list()
    if not infos:
        echo(f"no runs in {store} (make one with 'calib demo' or 'calib run CONFIG.toml')")
        return
    t = Table(title=f"runs in {store}")
    for col in ("id", "status", "model", "method", "metrics"):
        t.add_column(col, overflow="fold")
    for i in infos:
        metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in i.metrics.items() if k != "method")
        t.add_row(i.id, i.status if not i.error else f"{i.status}: {i.error[:60]}", Path(i.model).name, i.method,
                  metrics)
    Console(width=160).print(t)


def show_cmd(run: str = typer.Argument(..., help="Run id (or unique prefix) or run directory."),
             store: Path = typer.Option(Path("calib-runs"), "--store")) -> None:
    """Show one run: status, config, timings, metrics and artifacts."""
    from calib.runs import RunStore

    _print_run(RunStore(store).get(run), full=True)


def diff_cmd(run_a: str = typer.Argument(...), run_b: str = typer.Argument(...),
             store: Path = typer.Option(Path("calib-runs"), "--store"),
             top: int = typer.Option(15, "--top", help="Tensors with the largest range change to list.")) -> None:
    """Compare two runs: metrics, excluded nodes and ranges side by side."""
    from rich.console import Console
    from rich.table import Table

    from calib.runs import RunStore
    from calib.rundiff import diff_runs

    st = RunStore(store)
    d = diff_runs(st.get(run_a), st.get(run_b))
    con = Console(width=160)
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
    from calib.demo import run_demo

    prog = Progress()
    try:
        run = run_demo(store, data_dir, n_calib=n_calib, n_eval=n_eval, target=target, progress=prog,
                       command=["calib", *sys.argv[1:]], quick=quick)
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
    """Per method: output agreement, accuracy, cosine, worst layers; then every artifact."""
    from rich.console import Console
    from rich.table import Table

    m = run.manifest
    con = Console(width=160, quiet=is_quiet())
    t = Table(title=f"calib demo: {Path(m['model']['path']).name}, {m.get('n_samples')} calibration samples")
    for col in ("method", "top-1 agreement", "accuracy INT8", "accuracy FP32", "output cosine", "worst layers"):
        t.add_column(col, overflow="fold")
    for label, task in (m.get("metrics_by_method") or {}).items():
        worst = ""
        p = run.artifact(f"compare:{label}")
        if p is not None and p.exists():
            import json

            from calib.compare import CompareReport

            rep = CompareReport.from_json(json.loads(p.read_text()))
            worst = ", ".join(f"{r['node']} ({r['sqnr_db']:.1f} dB)" for r in rep.worst(3))
        mark = " (chosen)" if label == m.get("method") else ""
        t.add_row(label + mark, _fmt(task.get("top1_agreement")), _fmt(task.get("accuracy_int8")),
                  _fmt(task.get("accuracy_fp32")), _fmt(task.get("output_cosine")), worst)
    con.print(t)
    _print_run(run, full=False)


def _print_run(run, full: bool = False) -> None:
    m = run.manifest
    echo(f"run {run.id}: {run.status}")
    if m.get("error"):
        echo(f"  error: {m['error']}")
    met = m.get("metrics", {})
    if met:
        echo("  metrics: " + ", ".join(f"{k}={_fmt(v)}" for k, v in met.items()))
    if full:
        echo(f"  model: {m.get('model', {}).get('path')} (sha256 {m.get('model', {}).get('sha256', '')[:12]}…)")
        echo(f"  data: {m.get('data', {}).get('path')}")
        echo(f"  command: {' '.join(m.get('command', []))}")
        echo("  versions: " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()))
        echo("  timings (s): " + ", ".join(f"{k} {v}" for k, v in m.get("timings_s", {}).items()))
    echo("  artifacts:")
    for key, name in m.get("artifacts", {}).items():
        echo(f"    {key:<22} {run.dir / name}")
