"""TensorRT adapter: the only module in calib that imports ``tensorrt``.

Two ways to an INT8 engine (facts and sources in TENSORRT.md section 5):

* ``build_engine``: from the Q/DQ ONNX (explicit quantization), on TensorRT 10
  and 11, with a STRONGLY_TYPED network (precision comes from the model's Q/DQ
  and types; no INT8/FP16 builder flags). ``fp16=True`` on TensorRT 10 builds a
  weakly typed network with the FP16 and INT8 flags instead (strong typing
  forbids the flags); TensorRT 11 removed the flags, so there FP16 must come
  from the ONNX model's own types.
* ``build_engine_from_cache``: TensorRT 10 implicit INT8 from the FP32 ONNX and
  our calibration cache, through ``CacheCalibrator`` (an
  ``IInt8EntropyCalibrator2`` that serves the cache and no batches).
  TensorRT 11 removed calibrators.

``trtexec_commands`` gives the equivalent ``trtexec`` lines and needs no TensorRT.
Nothing here is faked: without TensorRT every build raises ``TensorRTUnavailable``.
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path
from typing import Any, Mapping

from calib.errors import ConfigError, ModelError, TensorRTUnavailable
from calib.io import write_bytes

__all__ = [
    "import_tensorrt",
    "tensorrt_version",
    "build_engine",
    "build_engine_from_cache",
    "make_cache_calibrator",
    "trtexec_commands",
    "engine_layer_info",
]

log = logging.getLogger(__name__)

_INSTALL_HINT = "install TensorRT (pip install 'calib[trt]') on a machine with an NVIDIA GPU and driver; " \
                "or run the printed trtexec command there (calib build-engine --print-trtexec)"


def import_tensorrt():
    """Import and return the ``tensorrt`` module, or raise ``TensorRTUnavailable`` saying why."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or a missing CUDA library surfacing as OSError
        raise TensorRTUnavailable(f"tensorrt does not import here ({type(e).__name__}: {e})",
                                  hint=_INSTALL_HINT) from None
    return trt


def tensorrt_version() -> tuple[int, ...]:
    trt = import_tensorrt()
    return tuple(int(p) for p in trt.__version__.split(".")[:3] if p.isdigit())


def _logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def _parse(trt, builder, network, onnx_path: Path, logger) -> None:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ModelError(f"{onnx_path}: TensorRT's ONNX parser rejects the model: {'; '.join(errors[:3])}"
                         + (f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""))


def _profile(trt, builder, network, config, shapes: Mapping[str, Any] | None, batch: int) -> None:
    """Add an optimisation profile when an input has dynamic dimensions.

    ``shapes``: input name -> (min, opt, max) shapes. Without it a dynamic batch
    axis (dim 0) is fixed to ``batch``; other dynamic dims must be given.
    """
    shapes = dict(shapes or {})
    profile, needed = builder.create_optimization_profile(), False
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        dims = tuple(inp.shape)
        if inp.name in shapes:
            lo, opt, hi = shapes[inp.name]
            profile.set_shape(inp.name, tuple(lo), tuple(opt), tuple(hi))
            needed = True
        elif any(d < 0 for d in dims):
            if any(d < 0 for d in dims[1:]):
                raise ConfigError(f"input '{inp.name}' has dynamic dimensions {dims}; give its (min, opt, max) "
                                  "shapes", hint="e.g. shapes={'x': ((1,3,224,224),)*3}")
            fixed = (batch,) + dims[1:]
            profile.set_shape(inp.name, fixed, fixed, fixed)
            needed = True
    if needed:
        config.add_optimization_profile(profile)


def _finish(trt, builder, network, config, out_path: str | os.PathLike) -> Path:
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ModelError("TensorRT failed to build the engine (see the TensorRT log above for the layer)")
    return write_bytes(out_path, bytes(plan))


def build_engine(qdq_path: str | os.PathLike, out_path: str | os.PathLike, *, fp16: bool = False,
                 workspace_bytes: int | None = None, shapes: Mapping[str, Any] | None = None,
                 batch: int = 1, detailed: bool = False) -> Path:
    """Build a serialized engine from a Q/DQ ONNX file and write it atomically to ``out_path``.

    ``detailed``: ProfilingVerbosity.DETAILED, so ``engine_layer_info`` reports formats per layer."""
    trt = import_tensorrt()
    major = tensorrt_version()[0]
    logger = _logger(trt)
    builder = trt.Builder(logger)
    flags = trt.NetworkDefinitionCreationFlag
    strongly_typed = hasattr(flags, "STRONGLY_TYPED") and not (fp16 and major < 11)
    if fp16 and major >= 11:
        raise ConfigError("TensorRT 11 has no FP16 builder flag (always strongly typed): the ONNX types decide",
                          hint="export with an FP16 remainder and build that without --fp16: "
                               "calib export MODEL --stats S --target-runtime trt -o model.int8.onnx")
    network = builder.create_network(1 << int(flags.STRONGLY_TYPED) if strongly_typed else 0)
    _parse(trt, builder, network, Path(qdq_path), logger)
    config = builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if detailed:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if not strongly_typed:
        config.set_flag(trt.BuilderFlag.INT8)
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
    _profile(trt, builder, network, config, shapes, batch)
    log.info("building a %s TensorRT %s engine from %s", "strongly typed" if strongly_typed else "weakly typed",
             trt.__version__, qdq_path)
    return _finish(trt, builder, network, config, out_path)


def make_cache_calibrator(cache: bytes):
    """An ``IInt8EntropyCalibrator2`` that serves ``cache`` and never asks for batches (TensorRT 10)."""
    trt = import_tensorrt()
    if not hasattr(trt, "IInt8EntropyCalibrator2"):
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} has no calibrators (removed in 11.0)",
                                  hint="build from the Q/DQ ONNX instead: calib build-engine model.int8.onnx")

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        """Serves a calibration cache; ``get_batch`` returns None so TensorRT uses the cache only."""

        def __init__(self, data: bytes) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._cache = bytes(data)

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names):
            return None

        def read_calibration_cache(self):
            return self._cache

        def write_calibration_cache(self, cache) -> None:
            return None

    return CacheCalibrator(cache)


def build_engine_from_cache(fp32_onnx: str | os.PathLike, cache: str | os.PathLike | bytes,
                            out_path: str | os.PathLike, *, fp16: bool = False,
                            workspace_bytes: int | None = None, shapes: Mapping[str, Any] | None = None,
                            batch: int = 1) -> Path:
    """TensorRT 10 implicit INT8: FP32 ONNX + calibration cache -> engine (weakly typed network)."""
    trt = import_tensorrt()
    data = cache if isinstance(cache, bytes) else Path(cache).read_bytes()
    calibrator = make_cache_calibrator(data)
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    _parse(trt, builder, network, Path(fp32_onnx), logger)
    config = builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    config.set_flag(trt.BuilderFlag.INT8)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    config.int8_calibrator = calibrator
    _profile(trt, builder, network, config, shapes, batch)
    return _finish(trt, builder, network, config, out_path)


def trtexec_commands(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *,
                     cache: str | os.PathLike | None = None, fp16: bool = False,
                     workspace_bytes: int | None = None) -> list[str]:
    """The trtexec lines equivalent to ``build_engine`` (Q/DQ model) or, with ``cache``, to
    ``build_engine_from_cache`` (``onnx_path`` then names the FP32 model). Lines starting with '#' are notes."""
    q = shlex.quote
    ws = [f"--memPoolSize=workspace:{max(1, int(workspace_bytes) // (1 << 20))}M"] if workspace_bytes else []
    if cache is None:
        cmd = ["trtexec", f"--onnx={q(str(onnx_path))}", f"--saveEngine={q(str(engine_path))}"] + ws
        lines = ["# TensorRT 10 and 11: explicit quantization from the Q/DQ ONNX (strongly typed)",
                 " ".join(cmd + ["--stronglyTyped"])]
        if fp16:
            lines += ["# TensorRT 10 with FP16 for the float layers (weakly typed; TensorRT 11 has no --fp16/--int8)",
                      " ".join(cmd + ["--int8", "--fp16"])]
        return lines
    cmd = ["trtexec", f"--onnx={q(str(onnx_path))}", "--int8", f"--calib={q(str(cache))}",
           f"--saveEngine={q(str(engine_path))}"] + (["--fp16"] if fp16 else []) + ws
    return ["# TensorRT 10.x only, implicit INT8 from the FP32 ONNX + calibration cache "
            "(TensorRT 11 removed --int8 and --calib; build from the Q/DQ ONNX there)",
            "# trtexec calibrates on random data if it cannot open the --calib file: check the path",
            " ".join(cmd)]


def engine_layer_info(engine_path: str | os.PathLike) -> str:
    """The engine's layer information as JSON text, as trtexec ``--exportLayerInfo`` writes it.

    Through ``IEngineInspector`` (``engine.create_engine_inspector()``,
    ``get_engine_information(LayerInformationFormat.JSON)``); an engine built
    without detailed profiling verbosity lists layer names only.
    """
    trt = import_tensorrt()
    logger = _logger(trt)
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise ModelError(f"{engine_path}: TensorRT cannot deserialize this engine (another TensorRT version or GPU?)")
    inspector = engine.create_engine_inspector()
    return inspector.get_engine_information(trt.LayerInformationFormat.JSON)
