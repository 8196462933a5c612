"""Bounded-memory collection: expose intermediate tensors in groups that fit a memory bound.

Exposing every needed tensor at once holds a whole batch of every activation: for a
detector at batch 100 that is gigabytes. With ``max_memory`` collection instead runs
several passes over the data, each exposing one *group* of tensors whose activations fit.

The bound is on the whole process's resident memory. ``collect`` first checks one pass with the model's own
shapes (ONNX shape inference at batch 1; an unknown shape counts as the largest known one; ONNX Runtime's
intermediate tensors counted twice, their channels padded to CHANNEL_BLOCK as its NCHWc layout may: a
1-channel 512x512 conv chain takes 8 times its shapes' bytes). If that does not fit, the graph ONNX Runtime optimised (below) is run once on the first sample with its node outputs exposed
(in chunks that fit), which gives the exact bytes per sample of every tensor it computes, and a pass over a
group g of exposed tensors at batch b is costed as (``MemoryPlan``)::

    RSS now (measured: Python, numpy, ONNX Runtime, the model and the optimised copy)
    + SESSION_COPIES x the optimised model (the group's proto, its bytes, ONNX Runtime's weights)
    + PASS_OVERHEAD (the session's kernels and thread pools) + HIST_BYTES x the tensors (their statistics)
    + b x ( peak of ONNX Runtime's intermediate tensors alive at once, from the node order (liveness)
            + INPUT_COPIES x the inputs + HELD_COPIES x the group's exposed tensors )

ONNX Runtime's CPU arena is off in these sessions, so freed tensors return to the system (with
``calib._memory.steady_malloc``, which the command line applies). Tensors are packed greedily in graph
order; the batch size is halved until one tensor per pass fits, and down to a quarter of that where it
makes fewer passes (each pass runs the model over every sample); a bound below what batch 1 needs is
refused (``InputDataError`` naming the minimum). bench/scale_out.py measures peak RSS against the bound.

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
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort

from calib.errors import InputDataError
from calib.model import Model
from calib.runtime import expose_outputs, make_session
from calib.stats import NUM_BINS

__all__ = ["tensor_bytes_per_sample", "inferred_shapes", "padded_bytes", "plan_groups", "optimized_exposed", "group_proto", "default_max_memory",
           "parse_bytes", "rss_bytes", "working_bytes", "measured_sizes", "MemoryPlan", "fit"]

log = logging.getLogger(__name__)

HELD_COPIES = 3  # an exposed tensor exists as ONNX Runtime's output, its numpy copy and the previous batch folding
INPUT_COPIES = 3  # the samples read, the stacked batch, the previous batch (inputs are folded on the first pass)
SESSION_COPIES = 3  # a pass's model: the group's proto, its serialised bytes, ONNX Runtime's copy of the weights
PASS_OVERHEAD = 8 << 20  # a pass's session beyond its weights (kernels, thread pools) and the fold's threads:
# 5-9 MiB measured on the peers suite's small CNNs (resnet_fmnist, fmnist_cnn) over a warmed ONNX Runtime
HIST_BYTES = 2 * NUM_BINS * 4  # one tensor's statistics: two int32 histograms (calib.stats)
CHANNEL_BLOCK = 16  # ONNX Runtime's NCHWc blocks channels by up to 16: the quick check's working memory pads to it

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
                            layout: str = "batch", channel_block: int = 1) -> dict[str, int]:
    """Estimated bytes per sample of each tensor (see the module doc); ``sample_shapes`` are one sample's.

    ``channel_block`` > 1 rounds the channel axis (axis 1) of tensors of rank 4 or more up to a multiple of it:
    an upper bound on ONNX Runtime's blocked layouts (NCHWc blocks channels by 8 or 16, so a 1-channel image
    takes 16 times its size inside the optimised graph)."""
    return padded_bytes(inferred_shapes(model, sample_shapes, layout), tensors, channel_block)


def inferred_shapes(model: Model, sample_shapes: dict[str, tuple[int, ...]], layout: str = "batch"
                    ) -> dict[str, tuple[list[int], int]]:
    """(dims at batch 1, item size) of every tensor whose shape ONNX shape inference knows for ``sample_shapes``."""
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
    known: dict[str, tuple[list[int], int]] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        dims = [d.dim_value for d in tt.shape.dim] if tt.HasField("shape") else []
        if not tt.elem_type or any(d <= 0 for d in dims):
            continue
        known[vi.name] = (dims, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize)
    return known


def padded_bytes(known: dict[str, tuple[list[int], int]], tensors: Sequence[str], channel_block: int = 1
                 ) -> dict[str, int]:
    """Bytes of ``tensors`` from ``inferred_shapes`` (channel axis rounded up as in ``tensor_bytes_per_sample``);
    a tensor of unknown shape counts as the largest known one."""
    def size(dims: list[int], itemsize: int) -> int:
        if channel_block > 1 and len(dims) >= 4:
            dims = [dims[0], -(-dims[1] // channel_block) * channel_block, *dims[2:]]
        return int(np.prod(dims, dtype=np.int64)) * itemsize

    sizes = {t: size(*v) for t, v in known.items()}
    fallback = max(sizes.values(), default=4)
    return {t: sizes.get(t, fallback) for t in tensors}


def plan_groups(tensors: Sequence[str], bytes_per_sample: dict[str, int], batch_size: int, budget: int,
                copies: int = HELD_COPIES) -> list[list[str]]:
    """Pack ``tensors`` (in order) into groups with ``copies * batch_size * sum(bytes) <= budget``."""
    groups: list[list[str]] = []
    cur: list[str] = []
    used = 0
    for t in tensors:
        cost = copies * batch_size * bytes_per_sample[t]
        if cur and used + cost > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(t)
        used += cost
    if cur:
        groups.append(cur)
    return groups


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


# ---- the memory bound: what a pass costs, measured where it can be -------------------------------------------



def rss_bytes() -> int | None:
    """Resident memory of this process now (/proc/self/statm); None where there is no /proc."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def working_bytes(proto: onnx.ModelProto, sizes: dict[str, int]) -> int:
    """Peak bytes (per sample) of the intermediate tensors alive at once when ``proto``'s nodes run in order,
    each freed after its last reader (graph inputs and initializers not counted)."""
    last: dict[str, int] = {}
    for k, n in enumerate(proto.graph.node):
        for t in list(n.input) + list(n.output):
            if t:
                last[t] = k
    cur = peak = 0
    for k, n in enumerate(proto.graph.node):
        cur += sum(sizes.get(o, 0) for o in n.output if o)
        peak = max(peak, cur)
        cur -= sum(sizes.get(t, 0) for t in set(n.output) | {i for i in n.input if i in sizes} if t and last[t] == k)
    return peak


def measured_sizes(optimized: onnx.ModelProto, feeds: dict[str, np.ndarray], providers: Sequence[str],
                   estimate: dict[str, int], chunk_bytes: int) -> dict[str, int]:
    """Bytes of every node output of ``optimized`` for ``feeds`` (one sample), read from ONNX Runtime's outputs.

    The outputs are exposed in chunks whose ``estimate``d size fits ``chunk_bytes`` (usually one chunk).
    """
    names = [o for n in optimized.graph.node for o in n.output if o]
    sizes: dict[str, int] = {}
    for chunk in plan_groups(names, estimate, 1, max(chunk_bytes, 1), copies=1):
        proto = group_proto(expose_outputs(optimized, chunk), chunk)
        sess = make_session(proto, providers, optimization="disable", arena=False)
        outs = [o.name for o in sess.get_outputs()]
        for name, value in zip(outs, sess.run(outs, feeds)):
            sizes[name] = int(getattr(value, "nbytes", 0))
        del sess
    return sizes


@dataclass
class MemoryPlan:
    """How collection fits ``max_memory`` (bytes; module doc): a pass over group g at batch b peaks at about
    ``fixed + b * (working + inputs * INPUT_COPIES + HELD_COPIES * sum(exposed[t] for t in g))``."""

    max_memory: int
    batch_size: int
    groups: list[list[str]]
    baseline: int  # this process's resident memory before the passes (measured)
    session: int  # one pass's model and ONNX Runtime session
    working: int  # per sample: ONNX Runtime's intermediate tensors alive at once
    inputs: int  # per sample
    exposed: dict[str, int]  # per sample
    stats: int = 0  # the statistics being folded (every tensor's histogram, held across the passes)

    @property
    def fixed(self) -> int:
        return self.baseline + self.session + self.stats + PASS_OVERHEAD

    def per_sample(self, group: Sequence[str] = ()) -> int:
        return self.working + INPUT_COPIES * self.inputs + HELD_COPIES * sum(self.exposed[t] for t in group)

    def peak(self, group: Sequence[str], batch_size: int | None = None) -> int:
        return self.fixed + (batch_size or self.batch_size) * self.per_sample(group)

    @property
    def minimum(self) -> int:
        """What batch 1 with one tensor per pass needs: less than this cannot be met."""
        return max(self.peak([t], 1) for t in self.exposed) if self.exposed else self.peak([], 1)

    def describe(self) -> str:
        return (f"process {self.baseline >> 20} MiB, model and session {self.session >> 20} MiB, statistics "
                f"{self.stats >> 20} MiB, ONNX Runtime's "
                f"tensors {self.working >> 20} MiB, inputs {INPUT_COPIES}x {self.inputs >> 20} MiB, largest tensor "
                f"{HELD_COPIES}x {max(self.exposed.values(), default=0) >> 20} MiB per sample")


def fit(plan: MemoryPlan, fetch: Sequence[str], batch_size: int, fixed_batch: bool) -> MemoryPlan:
    """Fill ``plan.groups`` (and lower the batch size if it must); ``InputDataError`` below the minimum."""
    if plan.max_memory < plan.minimum:
        raise InputDataError(f"--max-memory {_mib(plan.max_memory)} is below the {_mib(plan.minimum)} this model "
                             f"needs at batch 1 ({plan.describe()})",
                             hint=f"raise --max-memory to at least {-(-plan.minimum >> 20)}MB")
    b = batch_size
    while b > 1 and not fixed_batch and max(plan.peak([t], b) for t in fetch) > plan.max_memory:
        b = max(1, b // 2)
    if max(plan.peak([t], b) for t in fetch) > plan.max_memory:
        raise InputDataError(f"--max-memory {_mib(plan.max_memory)} is below the {_mib(plan.peak([], b))} this "
                             f"model needs at its fixed batch size {b} ({plan.describe()})")
    if b != batch_size:
        log.warning("max_memory %s: batch size lowered from %d to %d", _mib(plan.max_memory), batch_size, b)
    plan.batch_size = b
    plan.groups = plan_groups(fetch, plan.exposed, b, plan.max_memory - plan.fixed - b * plan.per_sample())
    # fewer, larger groups at a smaller batch: each pass runs the model over every sample, while ONNX Runtime's
    # time per sample hardly depends on the batch size
    for smaller in [x for x in (b // 2, b // 4) if x >= 1 and not fixed_batch]:
        groups = plan_groups(fetch, plan.exposed, smaller, plan.max_memory - plan.fixed - smaller * plan.per_sample())
        if len(groups) < len(plan.groups):
            plan.batch_size, plan.groups = smaller, groups
    if plan.batch_size != b:
        log.info("max_memory %s: batch size %d for %d pass(es) instead of more", _mib(plan.max_memory),
                 plan.batch_size, len(plan.groups))
    return plan


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"
