"""Bounded-memory collection: expose intermediate tensors in groups that fit a memory bound.

Exposing every needed tensor at once holds a whole batch of every activation: for a
detector at batch 100 that is gigabytes. With ``max_memory`` collection instead runs
several passes over the data, each exposing one *group* of tensors whose activations fit.

Estimate (stated, not measured per run): a tensor's bytes per sample come from ONNX shape
inference with the model inputs fixed to the first sample's shapes (batch 1); a tensor whose
shape stays unknown counts as the largest known one. Collection holds at most two batches of
the exposed tensors (one being folded, one just returned by ONNX Runtime), so a group's cost is
``2 * batch_size * sum(bytes per sample)``. The budget for it is ``max_memory`` minus a
baseline of twice the model's size (weights, ONNX Runtime's copy) and two batches of inputs.
Tensors are packed greedily in graph order; a tensor that alone exceeds the budget gets a
group of its own (logged).

Exactness: ONNX Runtime fuses nodes differently when other tensors are graph outputs, which
changes some values in the last bits. So the model with *every* needed tensor exposed is
optimised once (the same optimisation level one-pass collection uses), and each group's
session runs that optimised graph with only the group's outputs and no further optimisation:
node for node the same kernels, hence bit for bit the values of one-pass collection.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort

from calib.errors import InputDataError
from calib.model import Model
from calib.runtime import make_session

__all__ = ["tensor_bytes_per_sample", "plan_groups", "optimized_exposed", "group_proto", "default_max_memory",
           "parse_bytes"]

log = logging.getLogger(__name__)

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}


def parse_bytes(text: str) -> int:
    """``"2GB"`` -> 2147483648 (binary units: K/KB/KiB = 1024); plain integers are bytes."""
    t = str(text).strip().upper().replace(" ", "")
    num = t.rstrip("BKMGTI")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value <= 0:
        raise InputDataError(f"memory size '{text}' is not understood", hint="write e.g. 2GB, 512MB or 1073741824")
    return int(value * _UNITS[unit])


def default_max_memory(fraction: float = 0.5) -> int | None:
    """``fraction`` of the memory available now (``MemAvailable`` in /proc/meminfo); None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * fraction)
    except OSError:
        return None
    return None


def tensor_bytes_per_sample(model: Model, tensors: Sequence[str], sample_shapes: dict[str, tuple[int, ...]],
                            layout: str = "batch") -> dict[str, int]:
    """Estimated bytes per sample of each tensor (see the module doc); ``sample_shapes`` are one sample's."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    del proto.graph.value_info[:]
    for vi in proto.graph.input:
        if vi.name in sample_shapes:
            shape = sample_shapes[vi.name] if layout == "feed" else (1, *sample_shapes[vi.name])
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for d in shape:
                dims.add().dim_value = int(d)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as e:  # inference is only an estimate: fall back to the stored shapes
        log.info("shape inference failed (%s); using the model's stored shapes", e)
        inferred = model.proto
    known: dict[str, int] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        dims = [d.dim_value for d in tt.shape.dim] if tt.HasField("shape") else []
        if not tt.elem_type or any(d <= 0 for d in dims):
            continue
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
        known[vi.name] = int(np.prod(dims, dtype=np.int64)) * itemsize
    fallback = max(known.values(), default=4)
    return {t: known.get(t, fallback) for t in tensors}


def plan_groups(tensors: Sequence[str], bytes_per_sample: dict[str, int], batch_size: int, budget: int
                ) -> list[list[str]]:
    """Pack ``tensors`` (in order) into groups with ``2 * batch_size * sum(bytes) <= budget``."""
    groups: list[list[str]] = []
    cur: list[str] = []
    used = 0
    for t in tensors:
        cost = 2 * batch_size * bytes_per_sample[t]
        if cur and used + cost > budget:
            groups.append(cur)
            cur, used = [], 0
        if cost > budget:
            log.warning("tensor '%s' alone needs ~%d MiB per pass, over the %d MiB budget", t, cost >> 20,
                        max(budget, 0) >> 20)
        cur.append(t)
        used += cost
    if cur:
        groups.append(cur)
    return groups


def group_budget(model: Model, max_memory: int, batch_size: int, input_bytes_per_sample: int) -> int:
    """``max_memory`` minus the baseline (twice the model, two batches of inputs)."""
    model_bytes = model.proto.ByteSize()
    return int(max_memory) - 2 * model_bytes - 2 * batch_size * input_bytes_per_sample


def optimized_exposed(exposed: onnx.ModelProto, providers: Sequence[str],
                      optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                      ) -> onnx.ModelProto:
    """``exposed`` (every needed tensor already a graph output) as optimised by ONNX Runtime (module doc)."""
    with tempfile.TemporaryDirectory(prefix="calib-groups-") as d:
        make_session(exposed, providers, optimization=optimization,
                     optimized_model_path=os.path.join(d, "optimized.onnx"))
        return onnx.load(Path(d) / "optimized.onnx")


def group_proto(optimized: onnx.ModelProto, group: Sequence[str]) -> onnx.ModelProto:
    """The optimised model with only ``group`` as graph outputs and only the nodes they need.

    Run it with optimisation off. Dropping the nodes that do not lead to ``group`` changes no value
    (every remaining node is the same kernel on the same inputs); it saves their time and memory
    (ONNX Runtime does not remove dead nodes when optimisation is off).
    """
    m = onnx.ModelProto()
    m.CopyFrom(optimized)
    keep = set(group)
    outs = [o for o in m.graph.output if o.name in keep]
    del m.graph.output[:]
    m.graph.output.extend(outs)
    producer = {o: k for k, n in enumerate(m.graph.node) for o in n.output if o}
    needed, stack, live = set(keep), list(keep), set()
    while stack:
        k = producer.get(stack.pop())
        if k is None or k in live:
            continue
        live.add(k)
        for i in m.graph.node[k].input:
            if i and i not in needed:
                needed.add(i)
                stack.append(i)
    nodes = [n for k, n in enumerate(m.graph.node) if k in live]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    inits = [t for t in m.graph.initializer if t.name in needed]
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    return m
