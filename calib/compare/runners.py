"""Run models through Polygraphy's ONNX Runtime backend, one batch at a time.

Polygraphy's ``Comparator.run`` keeps every iteration's outputs in memory
(about 4 GB for 2,000 samples of a small CNN with every tensor marked). calib
builds the same runners (``BytesFromOnnx`` -> ``SessionFromOnnx`` ->
``OnnxrtRunner``), activates each once, and hands each batch's outputs to the
caller, who folds them into streaming accumulators and drops them.

Only the tensors to compare are marked as outputs (not every tensor, as
``--onnx-outputs mark all`` does: Q/DQ intermediates double the volume).

ONNX Runtime optimisation level: graph optimisations change the numbers of a
Q/DQ model. At "all", marking an intermediate tensor as a graph output stops ONNX
Runtime from fusing the Q/DQ group around it into an int8 kernel; even "basic"
rewrites Q/DQ pairs (measured on a small CNN: output SQNR 40.89 dB at "basic"
against 40.90 dB with optimisations off, and the "basic" figure changes again
once the same graph is part of a multi-variant model). So calib runs both models
with optimisations **off** ("disable") by default: every Q/DQ node is evaluated as
the ONNX specification defines it (round, saturate, rescale), which is what
TensorRT's explicit quantization describes, and the numbers cannot depend on
which tensors are marked or on how variants share a session. Other levels are
available; ORT's int8 kernels then differ by rounding.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Sequence

import numpy as np
import onnx

from calib.errors import ModelError

__all__ = ["OPTIMIZATION_LEVELS", "mark_outputs", "ModelRunner", "open_runner"]

log = logging.getLogger(__name__)

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


def _ort_level(level: str):
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if level not in levels:
        from calib.errors import ConfigError

        raise ConfigError(f"optimization level '{level}': expected one of {', '.join(OPTIMIZATION_LEVELS)}")
    return levels[level]


def mark_outputs(proto: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``proto`` whose graph outputs are exactly ``outputs`` (in that order).

    Polygraphy's ``ModifyOutputs`` takes fnmatch patterns, so a tensor named
    ``/blocks[0]/conv`` would be read as a pattern; calib marks exact names itself.
    """
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    known = {v.name: v for v in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input)}
    del m.graph.output[:]
    seen = set()
    for name in outputs:
        if name in seen:
            continue
        seen.add(name)
        vi = known.get(name)
        if vi is not None and vi.type.tensor_type.elem_type:
            m.graph.output.add().CopyFrom(vi)
        else:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return m


class ModelRunner:
    """An activated Polygraphy ``OnnxrtRunner``: ``run(feeds) -> {output: array}``."""

    def __init__(self, runner, outputs: list[str]) -> None:
        self._runner = runner
        self.outputs = outputs

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(self._runner.infer(feeds, check_inputs=False))


@contextlib.contextmanager
def _quiet_polygraphy() -> Iterator[None]:
    from polygraphy.logger import G_LOGGER

    old = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.ERROR
    try:
        yield
    finally:
        G_LOGGER.module_severity = old


@contextlib.contextmanager
def open_runner(proto: onnx.ModelProto, outputs: Sequence[str], *, optimization: str = "disable",
                providers: Sequence[str] | None = None, name: str = "model") -> Iterator[ModelRunner]:
    """Build and activate a Polygraphy ONNX Runtime runner whose outputs are ``outputs``."""
    from polygraphy.backend.onnx import BytesFromOnnx
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.exception import PolygraphyException

    from calib.collect import resolve_providers

    marked = mark_outputs(proto, outputs)
    level = _ort_level(optimization)
    provs = resolve_providers(providers)
    with _quiet_polygraphy():
        loader = SessionFromOnnx(BytesFromOnnx(marked), providers=provs, graph_optimization_level=level)
        runner = OnnxrtRunner(loader, name=name)
        try:
            runner.activate()
        except (PolygraphyException, Exception) as e:  # ORT raises its own Fail/InvalidGraph types
            msg = str(e).strip().splitlines()
            raise ModelError(f"{name}: ONNX Runtime cannot load the model: {msg[-1] if msg else type(e).__name__}",
                             hint="check that the model runs under onnxruntime") from None
    try:
        yield ModelRunner(runner, list(dict.fromkeys(outputs)))
    finally:
        with _quiet_polygraphy():
            runner.deactivate()
