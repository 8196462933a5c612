"""The one place that opens ONNX Runtime sessions and runs batches through them.

Every stage that runs a model (collect, bias correction, compare, sensitivity,
advise, drift, coverage) opens its session here, so providers, thread counts,
spinning, the graph optimisation level and the exposed outputs are decided once:

* ``make_session``: a session on a model proto. ``intra_op_threads`` defaults to the
  CPUs this process may use; ``spinning=False`` when other threads of ours compute
  beside ONNX Runtime (collect folds histograms while ORT runs the next batch).
* ``expose_outputs`` / ``mark_outputs``: intermediate tensors become graph outputs on
  a *copy* of the model (added to the outputs, or exactly these outputs in order).
* ``open_runner``: a session over exactly the marked outputs whose ``run(feeds)``
  returns ``{output: array}``; ``run_batches`` streams a source through several
  runners batch by batch, naming the samples when ONNX Runtime fails.

ONNX Runtime optimisation level for Q/DQ models: graph optimisations change the
numbers of a Q/DQ model. At "all", marking an intermediate tensor as a graph output
stops ONNX Runtime from fusing the Q/DQ group around it into an int8 kernel; even
"basic" rewrites Q/DQ pairs (measured on a small CNN: output SQNR 40.89 dB at
"basic" against 40.90 dB with optimisations off). So runners default to
optimisations **off** ("disable"): every Q/DQ node is evaluated as the ONNX
specification defines it (round, saturate, rescale), which is what TensorRT's
explicit quantization describes, and the numbers cannot depend on which tensors are
marked or on how variants share a session. Collection runs the FP32 model at "all".
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from calib.data.base import Sample, batches, limited
from calib.errors import CalibError, ConfigError, InputDataError, ModelError
from calib.model import Model

__all__ = ["OPTIMIZATION_LEVELS", "optimization_level", "resolve_providers", "usable_cpus", "expose_outputs",
           "mark_outputs", "make_session", "Runner", "open_runner", "run_batches"]

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "trt": "TensorrtExecutionProvider",
              "tensorrt": "TensorrtExecutionProvider", "dml": "DmlExecutionProvider",
              "openvino": "OpenVINOExecutionProvider", "coreml": "CoreMLExecutionProvider"}


def optimization_level(level: str | ort.GraphOptimizationLevel) -> ort.GraphOptimizationLevel:
    """ONNX Runtime's enum for a level name ("disable", "basic", "extended", "all")."""
    if isinstance(level, ort.GraphOptimizationLevel):
        return level
    if level not in _LEVELS:
        raise ConfigError(f"optimization level '{level}': expected one of {', '.join(OPTIMIZATION_LEVELS)}")
    return _LEVELS[level]


def resolve_providers(providers: Sequence[str] | None) -> list[str]:
    """Map short names ("cpu", "cuda") or full names to the execution providers ORT has here."""
    avail = ort.get_available_providers()
    if not providers:
        return ["CPUExecutionProvider"]
    out = []
    for p in providers:
        full = p if p.endswith("ExecutionProvider") else _PROVIDERS.get(p.lower(), p)
        if full not in avail:
            raise ModelError(f"execution provider '{p}' is not available in this onnxruntime "
                             f"(available: {', '.join(avail)})", hint="install the matching onnxruntime build")
        out.append(full)
    return out


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def expose_outputs(proto: onnx.ModelProto, tensors: Iterable[str]) -> onnx.ModelProto:
    """Return a copy of ``proto`` whose graph outputs also include ``tensors``."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    have = {o.name for o in m.graph.output}
    vi = {v.name: v for v in m.graph.value_info}
    for t in tensors:
        if t in have:
            continue
        out = m.graph.output.add()
        if t in vi:
            out.CopyFrom(vi[t])
        else:
            out.name = t
        have.add(t)
    return m


def mark_outputs(proto: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``proto`` whose graph outputs are exactly ``outputs`` (in that order, each once)."""
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


def make_session(proto: onnx.ModelProto, providers: Sequence[str] | None = None, *,
                 intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                 optimization: str | ort.GraphOptimizationLevel = "all", spinning: bool = True,
                 name: str | None = None, optimized_model_path: str | None = None,
                 arena: bool = True) -> ort.InferenceSession:
    """An ORT session on ``proto``; ``spinning=False`` when other threads of ours compute beside it.

    ``arena=False`` turns ONNX Runtime's CPU arena off, so resident memory follows the tensors alive.
    ``name`` (e.g. "Q/DQ model") prefixes the one-line error when ONNX Runtime cannot load it.
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = optimization_level(optimization)
    so.intra_op_num_threads = intra_op_threads or usable_cpus()
    if inter_op_threads:
        so.inter_op_num_threads = inter_op_threads
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = arena  # off: tensors freed go back to the system (calib.collect_groups' bound)
    if optimized_model_path:  # ONNX Runtime writes the graph it optimised there (calib.collect_groups)
        so.optimized_model_filepath = optimized_model_path
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    provs = resolve_providers(providers)
    try:
        return ort.InferenceSession(proto.SerializeToString(), so, providers=provs)
    except Exception as e:  # ORT raises its own Fail/InvalidGraph types
        msg = str(e).strip().splitlines()
        if name is None:
            raise ModelError(f"ONNX Runtime cannot load the model: {msg[0] if msg else type(e).__name__}") from None
        raise ModelError(f"{name}: ONNX Runtime cannot load the model: {msg[-1] if msg else type(e).__name__}",
                         hint="check that the model runs under onnxruntime") from None


class Runner:
    """A session over marked outputs: ``run(feeds) -> {output: array}`` (``outputs`` in marked order)."""

    def __init__(self, session: ort.InferenceSession, outputs: list[str]) -> None:
        self.session = session
        self.outputs = outputs
        self._names = [o.name for o in session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._names, self.session.run(None, feeds)))


@contextlib.contextmanager
def open_runner(proto: onnx.ModelProto, outputs: Sequence[str], *, optimization: str = "disable",
                providers: Sequence[str] | None = None, name: str = "model") -> Iterator[Runner]:
    """A ``Runner`` on a copy of ``proto`` whose outputs are exactly ``outputs``; closed on exit.

    Intra- and inter-op threads are the usable CPUs, spinning on (nothing of ours runs beside it).
    """
    cpus = usable_cpus()
    sess = make_session(mark_outputs(proto, outputs), providers, intra_op_threads=cpus, inter_op_threads=cpus,
                        optimization=optimization, name=name)
    try:
        yield Runner(sess, list(dict.fromkeys(outputs)))
    finally:
        del sess


def run_batches(source: Iterable[Sample], model: Model, batch_size: int, runners: Sequence[Runner],
                labels: Sequence[int] | None = None, limit: int | None = None):
    """Yield ``(ids, labels, [outputs of each runner])`` per batch, naming samples in run-time errors.

    ``ids`` is None for a "feed" layout source. At most one batch is alive at a time.
    """
    layout = getattr(source, "layout", "batch")
    seen = 0
    for ids, feeds, labs in batches(limited(source, limit), model.inputs, batch_size, layout=layout):
        if labels is not None:
            labs = [int(x) for x in labels[seen:seen + len(ids)]]
        outs = []
        for r in runners:
            try:
                outs.append(r.run(feeds))
            except Exception as e:  # ORT reports shape/type problems at run time
                if isinstance(e, CalibError):
                    raise
                msg = str(e).strip().splitlines()
                raise InputDataError(
                    f"samples {ids[0]}..{ids[-1]}: ONNX Runtime failed on this batch: {msg[-1] if msg else e}",
                    hint="check that the evaluation data fits the model's inputs") from None
        seen += len(ids)
        yield (ids if layout == "batch" else None), labs, outs
        del outs, feeds  # drop this batch before the next runs: peak memory stays at one batch
