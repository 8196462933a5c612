"""``calib export`` (Q/DQ ONNX, TensorRT cache, scale report) and ``calib build-engine``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from calib import trt as trt_adapter
from calib.calibrate import calibrate, calibrate_all, load_ranges, parse_method
from calib.cli._common import Progress, echo
from calib.errors import CalibError, ConfigError
from calib.export import DEFAULT_TRT_VERSION, export_qdq, scale_report, write_cache, write_scale_report
from calib.export.bias import correct_bias
from calib.export.placement import flagged_tensors
from calib.model import load_model
from calib.pipeline import open_run_data
from calib.stats import ActivationStats
from calib.export.precision import resolve_target
from calib.export.precision import apply_high_precision
from calib.export.ort_bias import ort_bias_line, ort_bias_report
from calib.export.trt_cache import model_cache
from calib.cli._preprocess import load_spec, preprocess_option, resolve_spec, show_spec
from calib.cli.pipeline import print_quantized
from calib.pipeline import quantize
from calib.data.preprocess import stamp_model

__all__ = ["register"]

_EXPORT_EPILOG = """Examples:

  calib export model.onnx --stats stats.npz --data calib/ -o model.int8.onnx   (auto: per tensor, measured)

  calib export model.onnx --stats stats.npz --method entropy -o model.int8.onnx

  calib export model.onnx --stats stats.npz -o model.int8.onnx --cache model.cache --report scales.json

  calib export model.onnx --ranges ranges.json --method percentile:99.99 -o m.int8.onnx --exclude /head/MatMul

  calib export model.onnx --stats stats.npz --target-runtime ort -o model.ort.int8.onnx

  calib export model.onnx --stats stats.npz --high-precision fp32 -o model.int8.fp32rest.onnx   (TensorRT
  placement, FP32 remainder: the FP16 default's reference)
"""

_BUILD_EPILOG = """Examples:

  calib build-engine model.int8.onnx -o model.engine

  calib build-engine model.int8.onnx -o model.engine --print-trtexec

  calib build-engine model.onnx --cache model.cache -o model.engine   (TensorRT 10 only)
"""


def register(app: typer.Typer) -> None:
    app.command(name="export", epilog=_EXPORT_EPILOG)(export_cmd)
    app.command(name="build-engine", epilog=_BUILD_EPILOG)(build_engine_cmd)


def _ranges_from_stats(stats_path: Path, model, method: str, want_all: bool):
    stats = ActivationStats.load(stats_path)
    stats.check_model(model)
    m = parse_method(method)
    chosen = calibrate(stats, m)
    all_ranges = {chosen.method: chosen}
    if want_all:
        for label, r in calibrate_all(stats).items():
            all_ranges.setdefault(label, r)
    flagged = flagged_tensors(stats)
    return chosen, all_ranges, stats, flagged


def _ranges_from_file(path: Path, method: Optional[str]):
    all_ranges = load_ranges(path)
    if method is None:
        if len(all_ranges) != 1:
            raise ConfigError(f"{path} holds ranges of {len(all_ranges)} methods ({', '.join(all_ranges)}); "
                              "pick one with --method")
        return next(iter(all_ranges.values())), all_ranges
    label = parse_method(method).label
    for key in (method, label):
        if key in all_ranges:
            return all_ranges[key], all_ranges
    raise ConfigError(f"{path} has no ranges for method '{method}' (it has {', '.join(all_ranges)})",
                      hint="run 'calib calibrate' with that method, or pick one of those")


def _check_outputs(*paths: Optional[Path]) -> None:
    """Refuse unusable output paths before any work (calib.io checks the folder's permissions only)."""

    for p in paths:
        if p is None:
            continue
        if p.is_dir():
            raise CalibError(f"{p}: is a folder; give a file path for the output")
        for parent in p.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise CalibError(f"{p}: cannot create the output folder ({parent} is a file)",
                                     hint="choose another output path")
                break


_METHOD_HELP = ("auto (per tensor, chosen by measured output effect; needs --data) | entropy | minmax | "
                "percentile[:P] | mse. Default: auto with --data, else entropy with --stats; with --ranges the "
                "file's only method.")
_DATA_HELP = ("Samples --method auto measures on (the calibration data the statistics came from: it chooses on "
              "a selection split by sample id, reports on the rest); --preprocess applies.")
_BIAS_MODE_HELP = ("robust: take a channel's mean shift off only where that lowers its mean absolute error "
                   "(default); mean: always (NNCF's fast bias correction; harmful where ranges clip outliers).")


def export_cmd(
    model: Path = typer.Argument(..., help="FP32 ONNX model (never modified)."),
    output: Path = typer.Option(..., "--output", "-o", help="Q/DQ ONNX model to write."),
    stats: Optional[Path] = typer.Option(None, "--stats", "-s", help="Statistics from 'calib collect' (.npz)."),
    ranges: Optional[Path] = typer.Option(None, "--ranges", "-r", help="ranges.json from 'calib calibrate' "
                                          "(instead of --stats)."),
    method: Optional[str] = typer.Option(None, "--method", "-m", help=_METHOD_HELP),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help=_DATA_HELP),
    placement: Optional[str] = typer.Option(None, "--placement", "-p", help="trt: TensorRT's Q/DQ rules "
                                            "(default, fp16 remainder); ort: ONNX Runtime's CPU int8 kernels "
                                            "(QLinearConv chains, fp32 remainder)."),
    target_runtime: Optional[str] = typer.Option(None, "--target-runtime", help="trt: TensorRT placement + fp16 "
                                                 "remainder; ort: ort placement + fp32 remainder."),
    high_precision: Optional[str] = typer.Option(None, "--high-precision", help="fp16 | bf16 | fp32: dtype of "
                                                 "everything not INT8 (default: the target runtime's: fp16 for "
                                                 "TensorRT, fp32 with --placement/--target-runtime ort)."),
    keep_fp32: List[str] = typer.Option([], "--keep-fp32", help="Node name or op type kept FP32 in an fp16/bf16 "
                                        "model (repeatable; overflowing tensors are found from --stats)."),
    exclude: List[str] = typer.Option([], "--exclude", "-x", help="Node name, op type or tensor name to keep "
                                      "float (repeatable)."),
    weights: str = typer.Option("per_channel", "--weights", help="per_channel | per_tensor."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Also write a TensorRT calibration cache "
                                         "(FP32 tensor names; TensorRT 10 implicit INT8)."),
    trt_version: Optional[int] = typer.Option(None, "--trt-version", help="Version in the cache header, "
                                              "NV_TENSORRT_VERSION style (default 100300 = TensorRT 10.3.0)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the JSON scale report."),
    bias_data: Optional[Path] = typer.Option(None, "--bias-data", help="Correct each quantized layer's bias for "
                                             "the mean error INT8 adds, measured on these samples (calibration "
                                             "data)."),
    bias_samples: int = typer.Option(128, "--bias-samples", help="Samples of --bias-data to use."),
    preprocess: Optional[Path] = preprocess_option(),
    bias_mode: str = typer.Option("robust", "--bias-mode", help=_BIAS_MODE_HELP),
) -> None:
    """Insert Q/DQ nodes into a copy of MODEL (explicit INT8 for TensorRT 10/11 and ONNX Runtime)."""
    if (stats is None) == (ranges is None):
        raise ConfigError("give exactly one of --stats and --ranges",
                          hint="calib export model.onnx --stats stats.npz -o model.int8.onnx")
    if bias_mode not in ("robust", "mean"):
        raise ConfigError(f"--bias-mode {bias_mode}: expected robust or mean")
    _check_outputs(output, cache, report)
    if _export_method(method, stats, data) == "auto":
        _check_auto(ranges, data, weights, bias_data)
        return _export_auto(model, output, stats, data, cache=cache, report=report, placement=placement,
                            target_runtime=target_runtime, high_precision=high_precision, keep_fp32=keep_fp32,
                            exclude=exclude, trt_version=trt_version, preprocess=preprocess)
    _export_named(model, output, stats, ranges, method, placement=placement, target_runtime=target_runtime,
                  high_precision=high_precision, keep_fp32=keep_fp32, exclude=exclude, weights=weights, cache=cache,
                  trt_version=trt_version, report=report, bias_data=bias_data, bias_samples=bias_samples,
                  preprocess=preprocess, bias_mode=bias_mode)


def _export_method(method: Optional[str], stats: Optional[Path], data: Optional[Path]) -> Optional[str]:
    """The method asked, else auto where it can measure (statistics and samples), else None (entropy with
    --stats; the ranges file's only method with --ranges)."""
    if method is not None:
        return method
    return "auto" if stats is not None and data is not None else None


def _check_auto(ranges: Optional[Path], data: Optional[Path], weights: str, bias_data: Optional[Path]) -> None:
    """What --method auto cannot take, refused before any work."""
    if ranges is not None:
        raise ConfigError("--method auto chooses among every candidate range of each tensor, which the statistics "
                          "hold: give --stats (from 'calib collect'), not --ranges")
    if data is None:
        raise ConfigError("--method auto needs --data: the samples it measures each tensor's candidates on",
                          hint="calib export model.onnx --stats stats.npz --data calib/ -o model.int8.onnx")
    if weights != "per_channel":
        raise ConfigError(f"--weights {weights} with --method auto: auto exports per-channel weights",
                          hint="give a named method (e.g. --method mse) for per-tensor weights")
    if bias_data is not None:
        raise ConfigError("--bias-data with --method auto: auto tries bias correction itself on --data and keeps "
                          "it only where it helps", hint="drop --bias-data, or give a named method")


def _export_auto(model: Path, output: Path, stats: Path, data: Path, *, cache, report, placement, target_runtime,
                 high_precision, keep_fp32, exclude, trt_version, preprocess) -> None:
    """``--method auto``: the default path of 'calib quantize' on statistics already collected (no second
    collection pass): choose per tensor on the selection split of --data, transforms kept where they help."""
    m = load_model(model)
    stats_obj = ActivationStats.load(stats)
    stats_obj.check_model(m)
    placement, dtype = resolve_target(target_runtime, placement, high_precision)
    spec = resolve_spec(model, data, preprocess)
    prog = Progress()
    try:
        res = quantize(model, data, output, method="auto", cache=cache, report=report, placement=placement,
                       exclude=exclude, high_precision=dtype, keep_fp32=keep_fp32,
                       trt_version=trt_version or DEFAULT_TRT_VERSION, preprocess=spec and spec.to_dict(),
                       stats=stats_obj, progress=prog)
    finally:
        prog.close()
    print_quantized(res, "")


def _export_named(model: Path, output: Path, stats: Optional[Path], ranges: Optional[Path], method: Optional[str],
                  *, placement, target_runtime, high_precision, keep_fp32, exclude, weights, cache, trt_version,
                  report, bias_data, bias_samples, preprocess, bias_mode) -> None:
    """One named method's ranges (from the statistics or a ranges file) exported as they are."""
    m = _load_noted(model)
    bias_source = _open_bias_data(bias_data, m, preprocess)
    stats_obj, flagged = None, {}
    if stats is not None:
        chosen, all_ranges, stats_obj, flagged = _ranges_from_stats(stats, m, method or "entropy",
                                                                    report is not None)
    else:
        chosen, all_ranges = _ranges_from_file(ranges, method)
    placement, dtype = resolve_target(target_runtime, placement, high_precision)
    qdq = export_qdq(m, chosen, weights=weights, placement=placement, exclude=exclude, flagged=flagged)
    if bias_source is not None:
        qdq = _bias_correct(m, qdq, bias_source, bias_samples, bias_mode)
    qdq, ort_bias = _high_precision(qdq, dtype, stats_obj, keep_fp32)
    doc = scale_report(qdq, all_ranges, chosen=chosen.method, stats=stats_obj) if report is not None else None
    if doc is not None and ort_bias:  # biases ONNX Runtime's default optimisation overflows (export.ort_bias)
        doc["onnxruntime_fp16_bias"] = ort_bias
    stamp_model(qdq.model, getattr(bias_source, "spec", None) or load_spec(preprocess))
    _write_outputs(qdq, m, chosen, output, cache, trt_version, report, doc)


def _load_noted(path: Path):
    """The FP32 model, with what loading it changed (opset upgrade, folded constants) printed."""
    m = load_model(path)
    for note in m.notes:
        echo(f"model: {note}")
    return m


def _open_bias_data(bias_data: Optional[Path], m, preprocess: Optional[Path]):
    """The --bias-data source (opened first, so bad data is reported before any work), or None."""
    if bias_data is None:
        return None
    spec = load_spec(preprocess)
    source = open_run_data(bias_data, m, preprocess=spec.to_dict() if spec is not None else None)
    show_spec(source, "bias data")
    return source


def _write_outputs(qdq, m, chosen, output: Path, cache: Optional[Path], trt_version: Optional[int],
                   report: Optional[Path], doc) -> None:
    qdq.save(output)
    echo(f"{qdq.summary()} -> {output}")
    for t, why in list(qdq.skipped.items())[:5]:
        echo(f"  skipped {t}: {why}")
    if len(qdq.skipped) > 5:
        echo(f"  ... {len(qdq.skipped) - 5} more skipped (see --report)")
    if cache is not None:
        _write_model_cache(cache, qdq, m, chosen, trt_version)
    if doc is not None:
        write_scale_report(report, doc)
        echo(f"scale report ({len(doc['activations'])} tensors, {len(doc['weights'])} weights) -> {report}")


def _bias_correct(m, qdq, source, samples: int, mode: str):

    prog = Progress()
    try:
        bc = correct_bias(m, qdq, source, limit=samples, robust=mode == "robust", progress=prog)
    finally:
        prog.close()
    info = bc.to_json()
    largest = info["largest"][:1]
    echo(f"bias correction: {info['channels_corrected']} of {info['channels']} channels in {len(bc.shifts)} "
         f"layer(s) corrected on {bc.n_samples} samples"
         + (f", largest shift {largest[0]['max_abs_shift']:.3g} at {largest[0]['node']}" if largest else "")
         + (f"; {len(bc.skipped)} skipped" if bc.skipped else ""))
    return bc.qdq


def _high_precision(qdq, dtype: str, stats, keep_fp32):
    """The cast model, printed; and what ONNX Runtime's default optimisation breaks in it (None: nothing)."""
    if dtype == "fp32":
        return qdq, None
    qdq, prec = apply_high_precision(qdq, dtype, stats=stats, keep_fp32=keep_fp32)
    echo(prec.summary())
    for node, why in list(prec.kept_fp32.items())[:5]:
        echo(f"  FP32 {node}: {why}")
    ort_bias = ort_bias_report(qdq.model)
    if ort_bias:
        echo(ort_bias_line(ort_bias))
    return qdq, ort_bias


def _write_model_cache(path: Path, qdq, m, chosen, trt_version: Optional[int]) -> None:
    """The cache of the written model: its QuantizeLinear scales, no float-kept inputs or skipped tensors."""

    entries = model_cache(qdq, m, chosen)
    write_cache(path, entries, version=trt_version or DEFAULT_TRT_VERSION, scales=True)
    echo(f"TensorRT calibration cache ({len(entries)} tensors, {chosen.method}) -> {path}")


def build_engine_cmd(
    model: Path = typer.Argument(..., help="Q/DQ ONNX from 'calib export' (or the FP32 model with --cache)."),
    output: Path = typer.Option(..., "--output", "-o", help="Serialized TensorRT engine to write."),
    fp16: bool = typer.Option(False, "--fp16", help="Let float layers run in FP16 (TensorRT 10 only: weakly typed "
                              "build with INT8+FP16 flags)."),
    workspace_mb: Optional[int] = typer.Option(None, "--workspace-mb", help="Builder workspace limit in MiB."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="TensorRT 10 implicit INT8: MODEL is the FP32 "
                                         "ONNX and this is the calibration cache from 'calib export --cache'."),
    batch: int = typer.Option(1, "--batch", help="Batch size for a dynamic batch axis."),
    print_trtexec: bool = typer.Option(False, "--print-trtexec", help="Print the equivalent trtexec command "
                                       "lines and exit without building (works without TensorRT)."),
) -> None:
    """Build a TensorRT engine (strongly typed where the TensorRT version has it)."""

    workspace = workspace_mb * (1 << 20) if workspace_mb else None
    if print_trtexec:
        for line in trt_adapter.trtexec_commands(model, output, cache=cache, fp16=fp16, workspace_bytes=workspace):
            print(line)
        return
    if not model.exists():
        raise ConfigError(f"{model}: no such file")
    _check_outputs(output)
    if cache is not None:
        path = trt_adapter.build_engine_from_cache(model, cache, output, fp16=fp16, workspace_bytes=workspace,
                                                   batch=batch)
    else:
        path = trt_adapter.build_engine(model, output, fp16=fp16, workspace_bytes=workspace, batch=batch)
    echo(f"TensorRT {'.'.join(map(str, trt_adapter.tensorrt_version()))} engine -> {path}")
