"""``calib compare`` (FP32 vs INT8, layer by layer) and ``calib advise`` (automatic mixed precision)."""

from __future__ import annotations

import contextlib

from pathlib import Path
from typing import List, Optional

import typer

from calib.cli._common import Progress, echo
from calib.compare import compare
from calib.compare.advice import advice_json_path, advise
from calib.compare.html import write_html
from calib.compare.ray_eval import RayEvaluation
from calib.compare.targets import load_metric, parse_target
from calib.data import open_data
from calib.data.arrays import MAX_LABELS_BYTES
from calib.errors import ConfigError, InputDataError, TargetNotMet
from calib.io import npy_header
from calib.model import load_model
from calib.stats import ActivationStats
from calib.config import DEFAULT_BATCH_SIZE
from calib.export.ort_bias import ort_bias_line, ort_bias_report
from calib.export.precision import apply_high_precision, resolve_target
from calib.io import save_onnx
from calib.compare.deployed import deployed_json, verify_deployed
from calib.data.base import batches
from calib.io import write_json
from calib.cli._preprocess import show_spec
from calib.data.preprocess import spec_of_model

__all__ = ["register", "read_labels"]

_COMPARE_EPILOG = """Examples:

  calib compare model.onnx model.int8.onnx --data eval.npz -o compare.json --html report.html

  calib compare model.onnx model.int8.onnx --data eval.npz -o compare.json --sensitivity --stats stats.npz

  calib compare model.onnx model.int8.onnx --data eval.npz -o c.json --labels labels.txt --metric mypkg.m:iou
"""

_ADVISE_EPILOG = """Examples:

  calib advise model.onnx --stats stats.npz --data eval.npz --target cosine:0.99 -o model.int8.onnx

  calib advise model.onnx --stats stats.npz --data eval.npz --target top1:0.99 --method entropy,percentile -o m.onnx

Targets: cosine:V, sqnr:DB, top1:V (agreement), accuracy:V (needs labels), metric:V (with --metric).
Writes the Q/DQ model and, beside it, NAME.advice.json (exclude list, per-step curve, per-tensor methods).
Exit 1 if the target is not met even with every node in float (the best model is still written).
"""


def register(app: typer.Typer) -> None:
    app.command(name="compare", epilog=_COMPARE_EPILOG)(compare_cmd)
    app.command(name="advise", epilog=_ADVISE_EPILOG)(advise_cmd)


def read_labels(path: Path, n: int) -> list[int]:
    """Labels from ``.npy`` (integers) or text (one integer per line), one per sample in data order."""
    import numpy as np

    if not path.exists():
        raise InputDataError(f"{path}: no such file", hint="check the labels path")
    if path.suffix == ".npy":
        try:
            with open(path, "rb") as f:  # size checked from the header before numpy reads the array
                npy_header(f, str(path), size=path.stat().st_size, max_bytes=MAX_LABELS_BYTES)
            arr = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise InputDataError(f"{path}: not a plain .npy array ({e})") from None
        if arr.dtype.kind not in "iu" or arr.ndim != 1:
            raise InputDataError(f"{path}: labels must be a 1-D integer array, got {arr.dtype} {arr.shape}")
        labels = [int(x) for x in arr]
    else:
        labels = []
        if not path.is_file() or path.stat().st_size > MAX_LABELS_BYTES:
            raise InputDataError(f"{path}: not a labels file ({'a folder' if path.is_dir() else 'too big'})")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        for k, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line:
                continue
            try:
                labels.append(int(line))
            except ValueError:
                raise InputDataError(f"{path} line {k}: expected an integer label, got '{line[:40]}'") from None
    if len(labels) != n:
        raise InputDataError(f"{path}: {len(labels)} labels for {n} samples", hint="give one label per sample")
    return labels


def _metric(spec: Optional[str]):
    if not spec:
        return None

    return load_metric(spec)


def evaluation_backend(backend: str, address: Optional[str], num_workers: int):
    """Where evaluation runs: here (``local``) or on Ray (``calib.compare.ray_eval``), as a context manager."""
    if backend == "local":
        return contextlib.nullcontext()
    if backend != "ray":
        raise ConfigError(f"backend '{backend}' is not one of ['local', 'ray']")
    return RayEvaluation(num_workers, address=address)  # imports Ray (the [ray] extra) when it starts


def compare_cmd(
    fp32: Path = typer.Argument(..., help="FP32 ONNX model."),
    qdq: Path = typer.Argument(..., help="Q/DQ (INT8) ONNX model derived from it."),
    data: Path = typer.Option(..., "--data", "-d", help="Evaluation data (.npz keyed by input name, ...)."),
    output: Path = typer.Option(..., "--output", "-o", help="compare.json to write."),
    html_path: Optional[Path] = typer.Option(None, "--html", help="Also write an HTML report (opens offline; plotly.min.js is written beside it)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Labels (.npy or one integer per line)."),
    metric: Optional[str] = typer.Option(None, "--metric", help="User metric: package.module:function."),
    stats: Optional[Path] = typer.Option(None, "--stats", help="Statistics (.npz) for the report's histograms."),
    sensitivity: bool = typer.Option(False, "--sensitivity", help="Also rank the quantized nodes by sensitivity."),
    sensitivity_samples: int = typer.Option(128, "--sensitivity-samples", help="Samples for --sensitivity at most."),
    batch_size: int = typer.Option(DEFAULT_BATCH_SIZE, "--batch-size", "-b", help="Samples per ONNX Runtime run."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use at most this many samples."),
    optimization: str = typer.Option("disable", "--ort-optimization",
                                     help="ONNX Runtime level: disable|basic|extended|all (see docs)."),
    provider: List[str] = typer.Option(["cpu"], "--provider", help="ONNX Runtime execution provider(s)."),
    deployed: bool = typer.Option(False, "--deployed", help="Also run the Q/DQ model as ONNX Runtime deploys it "
                                  "(default optimisation, real outputs only) vs the spec; name fused nodes that differ."),
    backend: str = typer.Option("local", "--backend", help="local (this process) or ray (batches scored by Ray "
                                "workers; same results bit for bit)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: start a local Ray)."),
    num_workers: int = typer.Option(2, "--num-workers", help="Ray workers (one CPU each)."),
) -> None:
    """Compare an FP32 model and its Q/DQ model layer by layer and at the outputs."""
    fm = load_model(fp32)
    qm = load_model(qdq)
    source = open_data(data, fm, spec=spec_of_model(qm.proto))  # the spec the Q/DQ model was calibrated with
    show_spec(source, "evaluation data")
    labs = read_labels(labels, len(source)) if labels is not None else None
    st = None
    if stats is not None:
        st = ActivationStats.load(stats)
    prog = Progress()
    backend_ctx = evaluation_backend(backend, address, num_workers)
    try:
        with backend_ctx:  # sensitivity and output scoring run on the backend; the layer pass here
            report = compare(fm, qm, source, batch_size=batch_size, labels=labs, metric=_metric(metric), limit=limit,
                             optimization=optimization, providers=provider, sensitivity=sensitivity,
                             sensitivity_samples=sensitivity_samples, progress=prog)
    finally:
        prog.close()
    report.save(output)
    echo(report.summary())
    echo(f"-> {output}")
    if html_path is not None:
        write_html(html_path, report, stats=st, title=f"calib: {fp32.name} vs {qdq.name}")
        echo(f"-> {html_path}")
    if deployed:

        first = (s for _, s in zip(range(limit or 64), source))
        feeds = [f for _, f, _ in batches(first, fm.inputs, batch_size, layout=getattr(source, "layout", "batch"))]
        dep = verify_deployed(qm.proto, feeds, providers=provider)
        echo(dep.summary())
        side = write_json(output.with_suffix(".deployed.json"), deployed_json(dep))
        echo(f"-> {side}")


def advise_cmd(
    model: Path = typer.Argument(..., help="FP32 ONNX model (never modified)."),
    stats: Path = typer.Option(..., "--stats", help="Statistics from 'calib collect' (.npz)."),
    data: Path = typer.Option(..., "--data", "-d", help="Evaluation data (held out from calibration)."),
    target: str = typer.Option("cosine:0.99", "--target", "-t", help="METRIC:VALUE, e.g. cosine:0.99, top1:0.99."),
    output: Path = typer.Option(..., "--output", "-o", help="Q/DQ model to write (.onnx)."),
    method: Optional[str] = typer.Option(None, "--method", "-m",
                                         help="Calibration methods to try, first = base ('auto': per-tensor choice; "
                                              "default: all four, starting from the best on --data)."),
    placement: Optional[str] = typer.Option(None, "--placement", help="Q/DQ placement: trt (default) | ort."),
    target_runtime: Optional[str] = typer.Option(None, "--target-runtime", help="trt: TensorRT placement + fp16 "
                                                 "remainder; ort: ort placement + fp32 (see calib export)."),
    high_precision: Optional[str] = typer.Option(None, "--high-precision", help="fp16 | bf16 | fp32 remainder of "
                                                 "the written model (default: fp16 for TensorRT, fp32 with "
                                                 "--placement ort; advise itself measures the fp32 one)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Labels (.npy or one integer per line)."),
    metric: Optional[str] = typer.Option(None, "--metric", help="User metric: package.module:function."),
    html_path: Optional[Path] = typer.Option(None, "--html", help="Also write an HTML report of the final model."),
    batch_size: int = typer.Option(DEFAULT_BATCH_SIZE, "--batch-size", "-b", help="Samples per ONNX Runtime run."),
    sensitivity_samples: int = typer.Option(32, "--sensitivity-samples", help="Samples for the ranking at most."),
    candidate_samples: Optional[int] = typer.Option(
        None, "--candidate-samples", help="Samples to compare a step's candidates on (default: all; every "
                                          "chosen step is verified on all)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many greedy steps."),
    time_budget: Optional[float] = typer.Option(
        None, "--time-budget", min=0.0, help="Seconds (default 240): try no new node after this (at least one is tried); keep the best model."),
    optimization: str = typer.Option("disable", "--ort-optimization", help="ONNX Runtime level."),
    provider: List[str] = typer.Option(["cpu"], "--provider", help="ONNX Runtime execution provider(s)."),
    backend: str = typer.Option("local", "--backend", help="local (this process) or ray (batches scored by Ray "
                                "workers; same results bit for bit)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: start a local Ray)."),
    num_workers: int = typer.Option(2, "--num-workers", help="Ray workers (one CPU each)."),
) -> None:
    """Find the fewest nodes to leave in float (and better per-tensor ranges) so a target holds."""
    tgt = parse_target(target)  # fail fast, before any work
    placement, dtype = resolve_target(target_runtime, placement, high_precision)
    fm, st = load_model(model), ActivationStats.load(stats)
    st.check_model(fm)
    source = open_data(data, fm)
    show_spec(source, "evaluation data")
    labs, methods = read_labels(labels, len(source)) if labels is not None else None, _methods(method)
    prog, backend_ctx = Progress(), evaluation_backend(backend, address, num_workers)
    try:
        with backend_ctx:  # every candidate scored on the backend: the same choices as local
            adv = advise(fm, st, source, target=tgt, methods=methods, placement=placement, batch_size=batch_size,
                         labels=labs, metric=_metric(metric), sensitivity_samples=sensitivity_samples,
                         candidate_samples=candidate_samples, max_steps=max_steps, time_budget_s=time_budget,
                         optimization=optimization, providers=provider, output=output, progress=prog)
    except TargetNotMet as e:  # the best model found is still written, in the dtype asked for
        _ship_advice(e.advice, output, dtype, st, html_path, fm, source, labs, model.name, batch_size=batch_size,
                     optimization=optimization, providers=provider)
        raise
    finally:
        prog.close()
    _ship_advice(adv, output, dtype, st, html_path, fm, source, labs, model.name, batch_size=batch_size,
                 optimization=optimization, providers=provider)


def _ship_advice(adv, output: Path, dtype: str, st, html_path: Optional[Path], fm, source, labs, name: str, *,
                 batch_size: int, optimization: str, providers) -> None:
    """Print the advice, write the model with its high-precision remainder, and the HTML report of that model."""
    _print_advice(adv, output, advice_json_path(output))
    shipped = adv.qdq
    if dtype != "fp32":  # the written model gets the high-precision remainder; the advice JSON is unchanged
        shipped, prec = apply_high_precision(adv.qdq, dtype, stats=st)
        save_onnx(shipped.model, output)
        echo(f"{prec.summary()} -> {output}")
        if ort_bias := ort_bias_report(shipped.model):  # what ONNX Runtime's default optimisation breaks in it
            echo(ort_bias_line(ort_bias))
    if html_path is not None:  # the report describes the written model
        _advice_html(html_path, fm, adv, shipped, source, st, labs, name, batch_size=batch_size,
                     optimization=optimization, providers=providers)


def _methods(method: Optional[str]) -> Optional[list[str]]:
    return [m.strip() for m in method.split(",") if m.strip()] if method else None


def _advice_html(html_path: Path, fm, adv, shipped, source, st, labs, name: str, *, batch_size: int,
                 optimization: str, providers) -> None:
    report = compare(fm, shipped, source, batch_size=batch_size, labels=labs, optimization=optimization,
                     providers=providers)
    if adv.sensitivity is not None:
        report.sensitivity = adv.sensitivity.to_json()
    write_html(html_path, report, stats=st, advice=adv.to_json(), title=f"calib advise: {name}")
    echo(f"-> {html_path}")


def _print_advice(adv, output: Path, side: Path) -> None:
    first = adv.curve[0]["metric"]
    echo(f"{adv.target.metric}: {first:.6g} -> {adv.metric:.6g} (target {adv.target.value:g}) with "
         f"{len(adv.exclude)} float node(s) in {len(adv.curve) - 1} step(s)")
    if adv.exclude:
        echo("float nodes: " + ", ".join(adv.exclude))
    if adv.changed:
        echo("methods changed: " + ", ".join(f"{t}={m}" for t, m in adv.changed.items()))
    echo(f"-> {output}\n-> {side}")
