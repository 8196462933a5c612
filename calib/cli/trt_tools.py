"""``calib import-cache`` (calibration cache -> Q/DQ model, for TensorRT 11) and ``calib trt-check``
(files and a trtexec line to check an engine; read back its layer info)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from calib.cli._common import echo
from calib.errors import ConfigError
from calib.export.cache_import import cache_vs_stats, import_cache
from calib.export.ort_bias import ort_bias_line, ort_bias_report
from calib.export.precision import apply_high_precision, resolve_target
from calib.export.trt_cache import read_any_cache
from calib.io import write_json
from calib.model import load_model
from calib.stats import ActivationStats
from calib.compare.trt_check import write_kit
from calib.data import open_data
from calib.compare.trt_check import layer_report, parse_layer_info, read_layer_info
from calib import trt as trt_adapter
from calib.export.groups import fusion_groups

__all__ = ["register"]

_IMPORT_EPILOG = """Examples:

  calib import-cache model.onnx model.cache -o model.int8.onnx

  calib import-cache model.onnx calibration.flatbuffers -o model.int8.onnx --target-runtime trt

  calib import-cache model.onnx model.cache -o model.int8.onnx --stats stats.npz --report import.json
"""

_CHECK_EPILOG = """Examples:

  calib trt-check model.int8.onnx --data eval.npz -o check/ --reference model.onnx

  calib trt-check --layer-info check/layers.json --model model.int8.onnx
"""


def register(app: typer.Typer) -> None:
    app.command(name="import-cache", epilog=_IMPORT_EPILOG)(import_cache_cmd)
    app.command(name="trt-check", epilog=_CHECK_EPILOG)(trt_check_cmd)


def import_cache_cmd(
    model: Path = typer.Argument(..., help="FP32 ONNX model the cache was made for (never modified)."),
    cache: Path = typer.Argument(..., help="TensorRT <= 10 calibration cache (TRT-<version>-<calibrator> text, "
                                 "also ModelOpt's) or ONNX Runtime's calibration.cache/.json/.flatbuffers."),
    output: Path = typer.Option(..., "--output", "-o", help="Q/DQ ONNX model to write."),
    placement: Optional[str] = typer.Option(None, "--placement", "-p", help="trt (default) | ort."),
    target_runtime: Optional[str] = typer.Option(None, "--target-runtime", help="trt: + fp16 remainder; ort."),
    high_precision: Optional[str] = typer.Option(None, "--high-precision", help="fp16 | bf16 | fp32 (default: fp16 "
                                                 "for TensorRT, fp32 for ort)."),
    exclude: List[str] = typer.Option([], "--exclude", "-x", help="Node, op type or tensor kept float."),
    stats: Optional[Path] = typer.Option(None, "--stats", "-s", help="Fresh statistics: diff the cache's ranges "
                                         "against them (which tensors it clips or wastes)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write what was imported/missing as JSON."),
) -> None:
    """Turn a calibration cache into a Q/DQ model (TensorRT 11 has no implicit INT8: this is the migration)."""

    placement, dtype = resolve_target(target_runtime, placement, high_precision)
    m = load_model(model)
    ranges = read_any_cache(cache)
    st = None
    if stats is not None:

        st = ActivationStats.load(stats)
        st.check_model(m)
    imp = import_cache(m, ranges, placement=placement, exclude=exclude)
    qdq = imp.qdq
    ort_bias = None
    if dtype != "fp32":
        qdq, prec = apply_high_precision(qdq, dtype, stats=st)
        echo(prec.summary())
        if ort_bias := ort_bias_report(qdq.model):  # what ONNX Runtime's default optimisation breaks in it
            echo(ort_bias_line(ort_bias))
    qdq.save(output)
    echo(f"{len(ranges)} cache entries ({ranges.method}); {qdq.summary()} -> {output}")
    for label, names in (("the cache lacks", imp.cache_lacks), ("the model lacks", imp.model_lacks)):
        if names:
            echo(f"  {label} {len(names)} tensor(s): {', '.join(names[:5])}" + (" ..." if len(names) > 5 else ""))
    doc = imp.to_json() | ({"onnxruntime_fp16_bias": ort_bias} if ort_bias else {})
    if st is not None:
        rows = cache_vs_stats(ranges, st)
        doc["vs_stats"] = rows
        for r in [r for r in rows if r["verdict"] != "ok"][:8]:
            echo(f"  {r['verdict']:6s} {r['tensor']}: cache amax {r['cache_amax']:.4g} vs max|x| {r['max_abs']:.4g}"
                 + (f" (>= {r['clipped']:.2%} of values clipped)" if r["verdict"] == "clips" else
                    f" ({r['wasted_bits']:.1f} of 8 bits unused)"))
    if report is not None:
        write_json(report, doc)
        echo(f"-> {report}")


def trt_check_cmd(
    model: Optional[Path] = typer.Argument(None, help="Q/DQ ONNX model the engine is built from."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Evaluation samples for the check files."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for the check kit."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="FP32 model whose ONNX Runtime outputs "
                                             "are the reference (default: MODEL itself on ONNX Runtime CPU)."),
    limit: int = typer.Option(8, "--limit", help="Samples (one batch)."),
    threshold: float = typer.Option(0.01, "--accuracy-threshold", help="For trtexec --accuracyThreshold."),
    layer_info: Optional[Path] = typer.Option(None, "--layer-info", help="Read a trtexec --exportLayerInfo "
                                              "JSON and report INT8/FP16/FP32 layers instead."),
    group_model: Optional[Path] = typer.Option(None, "--model", help="With --layer-info: match layers to this "
                                               "model's fusion groups."),
    engine: Optional[Path] = typer.Option(None, "--engine", help="With tensorrt installed: read the layer info "
                                          "of this engine through the Python API."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the layer report as JSON."),
) -> None:
    """Write the files and trtexec line to check an engine against ONNX Runtime, or read its layer info."""
    if layer_info is not None or engine is not None:
        return _layers(layer_info, engine, group_model or model, report)
    if model is None or data is None or output is None:
        raise ConfigError("give MODEL, --data and -o (or --layer-info LAYERS.json)",
                          hint="calib trt-check model.int8.onnx --data eval.npz -o check/")

    m = load_model(model)
    ref = load_model(reference) if reference is not None else None
    kit = write_kit(m, open_data(data, m), output, reference=ref, limit=limit, model_path=model,
                    accuracy_threshold=threshold)
    echo(f"{kit['samples']} samples: {len(kit['inputs'])} input and {len(kit['outputs'])} reference output "
         f"file(s) (raw little-endian) -> {output}")
    for line in kit["trtexec"]:
        print(line)


def _layers(layer_info: Optional[Path], engine: Optional[Path], model: Optional[Path],
            report: Optional[Path]) -> None:
    import json


    if engine is not None:

        layers = parse_layer_info(json.loads(trt_adapter.engine_layer_info(engine)), source=str(engine))
    else:
        layers = read_layer_info(layer_info)
    groups = None
    if model is not None:
        import onnx


        groups = fusion_groups(onnx.load(str(model), load_external_data=False))
    doc = layer_report(layers, groups)
    split = ", ".join(f"{k} {v}" for k, v in sorted(doc["precision_counts"].items()))
    echo(f"{doc['layers']} layers: {split}; {len(doc['reformat_layers'])} reformat layer(s); "
         f"{len(doc['fp32_islands'])} FP32 island(s)")
    for isl in doc["fp32_islands"][:5]:
        echo(f"  FP32 island: {' -> '.join(isl[:4])}" + (" ..." if len(isl) > 4 else ""))
    if groups is not None:
        mixed = {a: e for a, e in doc["groups"].items() if len(e["precisions"]) > 1}
        echo(f"{len(doc['groups'])} of {len(groups)} calib groups seen; {len(doc['groups_split'])} split over "
             f"several layers; {len(mixed)} with mixed precision")
    if report is not None:

        write_json(report, doc)
        echo(f"-> {report}")
