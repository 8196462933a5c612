"""Bias correction: take out the mean error INT8 adds to each quantized weighted layer's output.

Quantizing a layer's weights and input shifts the mean of its output per channel
(rounding errors do not average out over a channel: Nagel et al., "Data-Free
Quantization", 2019, sec. 4.2; NNCF's "fast bias correction"). The shift is
measured per layer, in isolation, on real data: for each quantized Conv,
ConvTranspose, Gemm or MatMul ``N`` of a Q/DQ model, the FP32 model is run with a
"shadow" copy of ``N`` beside the original that reads the same FP32 input through
``N``'s own Q/DQ nodes and int8 weights. The graph itself reduces
``shadow(x) - N(x)`` to one sum per output channel, so a batch costs one FP32 run
plus one run of each shadow layer and memory stays at one batch. One pass measures
the shifts of several Q/DQ models (one shadow set each).

The measured mean shift is then subtracted from the layer's bias, in float:
``Conv``/``ConvTranspose``/``Gemm`` get a bias input if they had none; a
``MatMul`` is corrected through the ``Add`` of a constant that follows it (a
MatMul without one is left alone and listed in ``skipped``). Layers whose
quantization is unchanged by this (kept in float) are untouched. The model a
correction returns is a new ``QdqModel``; the one passed in is not changed.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from calib.export.fold import fold_batchnorm
from calib.export.qdq import QdqModel
from calib.graph import QDQ_OPS
from calib.model import Model
from calib.runtime import open_runner, run_batches

__all__ = ["BiasCorrection", "measure_bias_shifts", "apply_bias_shifts", "correct_bias", "BIAS_OPS"]

log = logging.getLogger(__name__)
Progress = Callable[[str, int, "int | None"], None]

BIAS_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class BiasCorrection:
    """A bias-corrected Q/DQ model and what was done to it."""

    qdq: QdqModel
    shifts: dict[str, np.ndarray]  # node -> per-output-channel mean shift (INT8 - FP32) taken off its bias
    skipped: dict[str, str] = field(default_factory=dict)  # node -> why it was not corrected
    n_samples: int = 0

    def to_json(self) -> dict[str, Any]:
        mags = {n: float(np.abs(s).max()) for n, s in self.shifts.items() if s.size}
        worst = sorted(mags, key=mags.get, reverse=True)[:10]
        return {"nodes": len(self.shifts), "n_samples": self.n_samples, "skipped": self.skipped,
                "channels": int(sum(s.size for s in self.shifts.values())),
                "channels_corrected": int(sum(np.count_nonzero(s) for s in self.shifts.values())),
                "largest": [{"node": n, "max_abs_shift": mags[n]} for n in worst]}


def _host(fp32: Model, qdq: QdqModel) -> onnx.ModelProto:
    """The FP32 graph ``qdq`` was exported from (BatchNormalization folded the same way when it was)."""
    proto = fp32.copy_proto()
    if qdq.folded:
        fold_batchnorm(proto)
    return proto


def _channel_info(node: onnx.NodeProto, weight: np.ndarray | None) -> tuple[int, int] | None:
    """(output channels, output rank or -1 for 'channel last, rank unknown') of a weighted node."""
    if weight is None:
        return None
    if node.op_type == "Conv":
        return int(weight.shape[0]), weight.ndim
    if node.op_type == "ConvTranspose":
        group = next((a.i for a in node.attribute if a.name == "group"), 1) or 1
        return int(weight.shape[1]) * group, weight.ndim
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return int(weight.shape[0] if trans_b else weight.shape[1]), 2
    if node.op_type == "MatMul" and weight.ndim == 2:
        return int(weight.shape[1]), -1
    return None


class _Shadow:
    """Builds the measuring graph: the FP32 host plus, per (label, node), a shadow layer and its reduction."""

    def __init__(self, host: onnx.ModelProto) -> None:
        self.host = host
        self.inits = {t.name: t for t in host.graph.initializer}
        self.host_tensors = {o for n in host.graph.node for o in n.output} | {i.name for i in host.graph.input} \
            | set(self.inits)
        self.host_nodes = {n.name: n for n in host.graph.node}
        self.outputs: dict[tuple[str, str], tuple[str, str, int]] = {}  # (label, node) -> (sum, shape, C)
        self._k = 0

    def _copy_init(self, qp_inits: Mapping[str, onnx.TensorProto], name: str, prefix: str) -> str:
        new = prefix + name
        if new not in self.inits:
            t = copy.deepcopy(qp_inits[name])
            t.name = new
            self.host.graph.initializer.append(t)
            self.inits[new] = t
        return new

    def add(self, label: str, qp: onnx.ModelProto, qp_producers, qp_inits, node: onnx.NodeProto,
            channels: int, rank: int, mu: np.ndarray | None = None) -> str | None:
        """Add the shadow of ``node`` (a node of the Q/DQ proto ``qp``); return why not, or None.

        Without ``mu`` the shadow reduces ``shadow - N`` to a sum per channel; with ``mu`` (the measured
        mean shift) it reduces ``|shadow - N|`` and ``|shadow - N - mu|`` instead (error before and after)."""
        hn = self.host_nodes.get(node.name)
        if hn is None or hn.op_type != node.op_type:
            return "not in the FP32 graph"
        self._k += 1
        prefix = f"__calib_bc{self._k}__"
        new_nodes: list[onnx.NodeProto] = []
        inputs = self._quantized_inputs(node, qp_producers, qp_inits, prefix, new_nodes)
        if isinstance(inputs, str):
            return inputs
        shadow = copy.deepcopy(node)
        shadow.name = prefix + node.name
        del shadow.input[:]
        shadow.input.extend(inputs)
        for j in range(2, len(shadow.input)):
            t = shadow.input[j]
            if t and t not in self.host_tensors:
                if t not in qp_inits:
                    return f"input '{t}' is not in the FP32 graph"
                shadow.input[j] = self._copy_init(qp_inits, t, prefix)
        del shadow.output[:]
        shadow.output.append(prefix + "out")
        diff = helper.make_node("Sub", [shadow.output[0], hn.output[0]], [prefix + "diff"], name=prefix + "sub")
        new_nodes += [shadow, diff]
        sums = self._reduce(prefix, diff.output[0], channels, rank, mu, new_nodes)
        self.host.graph.node.extend(new_nodes)
        self.outputs[(label, node.name)] = (tuple(sums), prefix + "n", channels)
        return None

    def _quantized_inputs(self, node: onnx.NodeProto, qp_producers, qp_inits, prefix: str,
                          new_nodes: list[onnx.NodeProto]) -> list[str] | str:
        """``node``'s inputs, with inputs 0 and 1 read through copies of their Q/DQ chains; or why not."""
        inputs = list(node.input)
        for idx in (0, 1):
            if idx >= len(inputs) or not inputs[idx]:
                continue
            t, chain = inputs[idx], []
            while t in qp_producers and qp_producers[t].op_type in QDQ_OPS:
                chain.append(qp_producers[t])
                t = qp_producers[t].input[0]
            if not chain:
                if t not in self.host_tensors:
                    return f"input '{t}' is not in the FP32 graph"
                continue
            if t in qp_inits:
                root = self._copy_init(qp_inits, t, prefix)
            elif t in self.host_tensors:
                root = t
            else:
                return f"input '{t}' is not in the FP32 graph"
            cur = root
            for q in reversed(chain):
                c = copy.deepcopy(q)
                c.name = prefix + q.name
                c.input[0] = cur
                for j in range(1, len(c.input)):
                    if c.input[j]:
                        c.input[j] = self._copy_init(qp_inits, c.input[j], prefix)
                c.output[0] = prefix + q.output[0]
                new_nodes.append(c)
                cur = c.output[0]
            inputs[idx] = cur
        return inputs

    def _reduce(self, prefix: str, diff: str, channels: int, rank: int, mu: np.ndarray | None,
                new_nodes: list[onnx.NodeProto]) -> list[str]:
        """Nodes reducing ``diff`` per channel (sum, or L1 before/after ``mu``); their output names."""
        if rank == -1:  # channel last, any rank: [.., C] -> [-1, C]
            shape_c = self._copy_const(prefix + "shape", np.array([-1, channels], np.int64))
            new_nodes.append(helper.make_node("Reshape", [diff, shape_c], [prefix + "flat"],
                                              name=prefix + "reshape"))
            red_in, axes = prefix + "flat", [0]
        else:
            red_in, axes = diff, [0] + list(range(2, rank))
        # ReduceSum takes axes as an input from opset 13 on; calib's models are opset >= 13 (calib.model)
        ax = self._copy_const(prefix + "axes", np.array(axes, np.int64))
        shp = helper.make_node("Shape", [red_in], [prefix + "n"], name=prefix + "shape_of")
        if mu is None:
            sums = [prefix + "sum"]
            new_nodes.append(helper.make_node("ReduceSum", [red_in, ax], sums, keepdims=0, name=prefix + "reduce"))
        else:  # mu broadcasts along the channel axis: [C] for channel-last, [C, 1, ..] for NC..
            mshape = [channels] if rank in (-1, 2) else [channels] + [1] * (rank - 2)
            m_c = self._copy_const(prefix + "mu", np.asarray(mu, np.float32).reshape(mshape))
            sums = [prefix + "l1_before", prefix + "l1_after"]
            new_nodes += [
                helper.make_node("Abs", [red_in], [prefix + "abs0"], name=prefix + "abs0"),
                helper.make_node("ReduceSum", [prefix + "abs0", ax], [sums[0]], keepdims=0, name=prefix + "red0"),
                helper.make_node("Sub", [red_in, m_c], [prefix + "centred"], name=prefix + "centre"),
                helper.make_node("Abs", [prefix + "centred"], [prefix + "abs1"], name=prefix + "abs1"),
                helper.make_node("ReduceSum", [prefix + "abs1", ax], [sums[1]], keepdims=0, name=prefix + "red1")]
        new_nodes.append(shp)
        return sums

    def _copy_const(self, name: str, value: np.ndarray) -> str:
        self.host.graph.initializer.append(numpy_helper.from_array(value, name))
        self.inits[name] = self.host.graph.initializer[-1]
        return name


def _targets(qdq: QdqModel) -> tuple[list[tuple[onnx.NodeProto, int, int]], dict[str, str]]:
    """Quantized weighted nodes of ``qdq`` that can be corrected: (node, channels, rank); and the rest."""
    qp = qdq.model
    producers = {o: n for n in qp.graph.node for o in n.output if o}
    inits = {t.name: t for t in qp.graph.initializer}
    quantized = set(qdq.quantized_nodes)
    out, skipped = [], {}
    for n in qp.graph.node:
        if n.op_type not in BIAS_OPS or n.name not in quantized:
            continue
        w_name = n.input[1] if len(n.input) > 1 else ""
        while w_name in producers and producers[w_name].op_type in QDQ_OPS:
            w_name = producers[w_name].input[0]
        if w_name not in inits:
            skipped[n.name] = "no constant weight"
            continue
        w = numpy_helper.to_array(inits[w_name])
        info = _channel_info(n, w)
        if info is None:
            skipped[n.name] = f"weight of shape {list(w.shape)}: no output-channel axis"
            continue
        if n.op_type == "MatMul" and _bias_add(qp, n, info[0]) is None:
            skipped[n.name] = "MatMul not followed by the Add of a constant bias"
            continue
        out.append((n, *info))
    return out, skipped


def _bias_add(qp: onnx.ModelProto, node: onnx.NodeProto, channels: int) -> tuple[onnx.NodeProto, int] | None:
    """The ``Add`` of a constant [C] (or [1, .., C]) bias right after a MatMul: (node, input index)."""
    inits = {t.name: t for t in qp.graph.initializer}
    users = [n for n in qp.graph.node if node.output[0] in n.input]
    if len(users) != 1 or users[0].op_type != "Add":
        return None
    add = users[0]
    for j, t in enumerate(add.input[:2]):
        if t != node.output[0] and t in inits:
            dims = list(inits[t].dims)
            if dims and dims[-1] == channels and int(np.prod(dims)) == channels:
                return add, j
    return None


def measure_bias_shifts(fp32: Model, qdqs: Mapping[str, QdqModel], source, *, batch_size: int = 16,
                        limit: int | None = 128, robust: bool = True, providers: Sequence[str] | None = None,
                        progress: Progress | None = None
                        ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, str]], int]:
    """Per label: node -> mean output shift (INT8 - FP32) per channel, measured in one pass over ``source``
    (its first ``limit`` samples); also the nodes skipped per label and the samples used.

    ``robust``: a second pass keeps a channel's shift only where taking it off lowers that channel's mean
    absolute error; elsewhere the shift is 0. A mean shift is the right correction for errors spread over
    every position (rounding), the wrong one for errors concentrated on a few (clipped outliers: the
    mean moves every position to fix a handful; measured on the peers benchmark, bench/results/bias-correction.md).
    """

    hosts = {bool(q.folded) for q in qdqs.values()}
    if len(hosts) > 1:  # the shadows of one pass share one host graph
        out, skip, n = {}, {}, 0
        for label, q in qdqs.items():
            s, k, n = measure_bias_shifts(fp32, {label: q}, source, batch_size=batch_size, limit=limit,
                                          robust=robust, providers=providers, progress=progress)
            out.update(s)
            skip.update(k)
        return out, skip, n
    first = next(iter(qdqs.values()))
    targets = {label: _targets(q) for label, q in qdqs.items()}
    skipped: dict[str, dict[str, str]] = {label: dict(t[1]) for label, t in targets.items()}

    def build(mu: dict[tuple[str, str], np.ndarray] | None) -> _Shadow:
        sh = _Shadow(_host(fp32, first))
        for label, q in qdqs.items():
            qp = q.model
            producers = {o: n for n in qp.graph.node for o in n.output if o}
            inits = {t.name: t for t in qp.graph.initializer}
            for node, channels, rank in targets[label][0]:
                if mu is not None and (label, node.name) not in mu:
                    continue
                why = sh.add(label, qp, producers, inits, node, channels, rank,
                             None if mu is None else mu[(label, node.name)])
                if why:
                    skipped[label][node.name] = why
        return sh

    sh = build(None)
    if not sh.outputs:
        return {label: {} for label in qdqs}, skipped, 0
    sums, done = _run(sh, fp32, source, batch_size, limit, providers, progress, "bias correction")
    mean = {k: (v[0] / max(v[-1], 1)).astype(np.float32) for k, v in sums.items()}
    if robust:  # second pass: per channel, is the mean absolute error lower with the shift taken off?
        l1, _ = _run(build(mean), fp32, source, batch_size, limit, providers, progress, "bias correction: check")
        for k, (before, after, _) in l1.items():
            mean[k] = np.where(after < before, mean[k], np.float32(0)).astype(np.float32)
    shifts: dict[str, dict[str, np.ndarray]] = {label: {} for label in qdqs}
    for (label, node), v in mean.items():
        shifts[label][node] = v
    return shifts, skipped, done


def _run(sh: _Shadow, fp32: Model, source, batch_size: int, limit: int | None, providers, progress, stage: str
         ) -> tuple[dict[tuple[str, str], tuple], int]:
    """One pass of the shadow graph: per (label, node), its per-channel sums and the count behind each."""
    acc = {k: [np.zeros(c, np.float64) for _ in names] for k, (names, _, c) in sh.outputs.items()}
    counts = {k: 0 for k in sh.outputs}
    fetch = [t for names, n, _ in sh.outputs.values() for t in (*names, n)]
    done = 0
    total = min(len(source), limit) if limit is not None and hasattr(source, "__len__") else None
    if progress:
        progress(stage, 0, total)
    with open_runner(sh.host, fetch, providers=providers, name="bias-correction model") as runner:
        for ids, _, outs in run_batches(source, fp32, batch_size, [runner], limit=limit):
            out = outs[0]
            for k, (names, n, c) in sh.outputs.items():
                for i, t in enumerate(names):
                    acc[k][i] += np.asarray(out[t], np.float64).reshape(c)
                counts[k] += int(np.prod(out[n])) // c
            done += len(ids) if ids is not None else 1
            if progress:
                progress(stage, done, total)
    return {k: (*acc[k], counts[k]) for k in acc}, done


def apply_bias_shifts(qdq: QdqModel, shifts: Mapping[str, np.ndarray]) -> QdqModel:
    """A copy of ``qdq`` with each node's bias lowered by its shift (see the module docstring)."""
    proto = copy.deepcopy(qdq.model)
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    nodes = {n.name: n for n in g.node}
    for name, shift in shifts.items():
        node = nodes[name]
        if node.op_type == "MatMul":
            found = _bias_add(proto, node, shift.size)
            if found is None:
                continue
            holder, j = found
        else:
            holder, j = node, 2
        old = holder.input[j] if j < len(holder.input) else ""
        if old and old in inits:
            t = inits[old]
            b = numpy_helper.to_array(t)
            new_b = (b.astype(np.float32).reshape(-1) - shift).reshape(b.shape).astype(b.dtype)
        elif old:  # a bias computed at run time: leave it
            continue
        else:
            new_b = (-shift).astype(np.float32)
        new_name = f"{name}_bias_corrected"
        k = 1
        while new_name in inits:
            new_name, k = f"{name}_bias_corrected_{k}", k + 1
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(new_b), new_name))
        inits[new_name] = g.initializer[-1]
        while len(holder.input) <= j:
            holder.input.append("")
        holder.input[j] = new_name
        if old:
            uses[old] -= 1
            if uses[old] == 0:  # the old bias is read by nobody now
                g.initializer.remove(inits.pop(old))
    onnx.checker.check_model(proto)
    return replace(qdq, model=proto)


def correct_bias(fp32: Model, qdq: QdqModel | Mapping[str, QdqModel], source, *, batch_size: int = 16,
                 limit: int | None = 128, robust: bool = True, providers: Sequence[str] | None = None,
                 progress: Progress | None = None) -> Any:
    """Bias-correct one Q/DQ model (returns a ``BiasCorrection``) or several in one pass (label -> one).
    ``robust``: see ``measure_bias_shifts``."""
    many = isinstance(qdq, Mapping)
    qdqs = dict(qdq) if many else {"model": qdq}
    shifts, skipped, n = measure_bias_shifts(fp32, qdqs, source, batch_size=batch_size, limit=limit,
                                             robust=robust, providers=providers, progress=progress)
    out = {label: BiasCorrection(apply_bias_shifts(q, shifts[label]), shifts[label], skipped[label], n)
           for label, q in qdqs.items()}
    for label, bc in out.items():
        log.info("bias correction (%s): %d nodes corrected on %d samples, %d skipped", label, len(bc.shifts), n,
                 len(bc.skipped))
    return out if many else out["model"]
