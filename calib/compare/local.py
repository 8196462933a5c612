"""Local error: where quantization error *enters* the model.

The accumulated error of a layer (``calib.compare.report``) includes everything
upstream. The **local** error of a quantized node X is X run in INT8 on FP32
inputs: a copy of X and of its Q/DQ chains (the Q/DQ model's scales and
weights) reads the FP32 model's tensors, and its output is compared with the
FP32 output of X. A layer with a low local SQNR causes loss; one with a good
local SQNR and a bad accumulated SQNR only inherits it.

``LocalModel`` is the FP32 model plus one such copy per quantized node, so the
FP32 pass of ``compare`` measures local errors at no extra pass over the data.
``local_errors`` runs it alone on a few samples (advise ranks nodes with it).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import onnx
from onnx import version_converter

from calib.compare.mapping import TensorMap
from calib.compare.metrics import TensorAccumulator
from calib.compare.runners import open_runner
from calib.data import batches
from calib.errors import ModelError
from calib.model import Model

__all__ = ["LocalModel", "local_model", "local_errors", "LOCAL_KEYS"]

log = logging.getLogger(__name__)
Progress = Callable[[str, int, "int | None"], None]

SUFFIX = "__local"
LOCAL_KEYS = ("cosine", "sqnr_db", "relative_error", "max_abs_error")


@dataclass
class LocalModel:
    """The FP32 model plus INT8 copies of each quantized node reading FP32 inputs."""

    proto: onnx.ModelProto
    pairs: dict[str, str]  # FP32 tensor (output of a quantized node) -> its local INT8 copy
    nodes: dict[str, str]  # FP32 tensor -> FP32 node
    skipped: dict[str, str] = field(default_factory=dict)  # FP32 node -> why no local copy was built
    acc: dict[str, TensorAccumulator] = field(default_factory=dict)

    @property
    def outputs(self) -> list[str]:
        return list(self.pairs) + list(self.pairs.values())

    def update(self, outs: dict[str, np.ndarray], ids: Sequence[str] | None) -> None:
        """Fold one batch of this model's outputs (FP32 tensors and their local copies)."""
        for f, loc in self.pairs.items():
            self.acc.setdefault(f, TensorAccumulator()).update(outs[f], outs[loc], ids)

    def fields(self, fp32_tensor: str) -> dict[str, Any]:
        """``local_*`` fields of one layer row (None when the tensor is not a quantized node's output)."""
        a = self.acc.get(fp32_tensor)
        r = a.result() if a is not None and a.n_samples else None
        return {f"local_{k}": (r[k] if r else None) for k in LOCAL_KEYS}

    def by_node(self) -> dict[str, dict[str, Any]]:
        """FP32 node -> local metrics of its (first) output."""
        out: dict[str, dict[str, Any]] = {}
        for f, node in self.nodes.items():
            if f in self.acc and node not in out:
                out[node] = {k: self.acc[f].result()[k] for k in LOCAL_KEYS}
        return out


def _copy_node(node: onnx.NodeProto, k: int, ren: dict[str, str], rev: Callable[[str], str | None], qinits: dict,
               inits: dict[str, onnx.TensorProto]) -> tuple[onnx.NodeProto, str | None]:
    """A copy of one Q/DQ-model node reading FP32 tensors, chain outputs or copied initializers."""
    c = copy.deepcopy(node)
    c.name = f"{node.name}{SUFFIX}{k}"
    for i, t in enumerate(node.input):
        if not t:
            continue
        if t in ren:
            c.input[i] = ren[t]
        elif t in qinits:
            c.input[i] = f"{t}{SUFFIX}"
            if c.input[i] not in inits:
                inits[c.input[i]] = copy.deepcopy(qinits[t])
                inits[c.input[i]].name = c.input[i]
        elif rev(t) is not None:
            c.input[i] = rev(t)
        else:
            return c, f"input '{t}' of '{node.name}' has no FP32 counterpart"
    for i, o in enumerate(node.output):
        if o:
            ren[o] = c.output[i] = f"{o}{SUFFIX}{k}"
    return c, None


def _onnx_opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)


def _at_opset(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The FP32 model at the Q/DQ model's opset when that is newer (an FP16-remainder export raises it to 19):
    its nodes then share one opset with the local copies (ReduceMean's ``axes`` attribute became an input at
    18, so the FP32 nodes cannot simply be declared at the newer opset). Tensor names are kept."""
    if _onnx_opset(proto) >= opset:
        return proto
    try:
        return version_converter.convert_version(proto, opset)
    except Exception as e:  # the converter raises plain RuntimeError/ValidationError
        raise ModelError(f"FP32 model: cannot raise it to the Q/DQ model's opset {opset} for the local-error "
                         f"model: {str(e).splitlines()[0]}", hint="export the FP32 model at the Q/DQ model's opset") from None


def local_model(fm: Model, tm: TensorMap) -> LocalModel:
    """Build the FP32 + local-copies model (see the module docstring); ``fm`` is not changed."""
    m = onnx.ModelProto()
    qproto = tm.qdq.proto
    m.CopyFrom(_at_opset(fm.proto, _onnx_opset(qproto)))
    del m.opset_import[:]
    m.opset_import.extend(qproto.opset_import)  # Q/DQ may need a newer opset than the FP32 model
    m.ir_version = max(m.ir_version, qproto.ir_version)
    qnodes = {n.name: n for n in qproto.graph.node}
    qinits = {t.name: t for t in qproto.graph.initializer}
    rev = {q: f for f, q in tm.sources.items()}
    fp_inits = {t.name: t for t in m.graph.initializer}
    # a Q/DQ-model initializer equal to the FP32 one of the same name is read from the FP32 model, not copied
    qinits = {k: t for k, t in qinits.items()
              if not (k in fp_inits and fp_inits[k].SerializeToString() == t.SerializeToString())}
    rev.update({k: k for k in fp_inits if k not in qinits})
    inits: dict[str, onnx.TensorProto] = {}
    read = _fp32_reader(rev, tm, m)
    lm = LocalModel(m, {}, {})
    for k, (fnode, qins) in enumerate(tm.quantized.items()):
        qn = qnodes.get(tm.nodes.get(fnode, ""))
        if qn is None:
            lm.skipped[fnode] = "no counterpart in the Q/DQ model"
            continue
        ren: dict[str, str] = {}
        new, why = [], None
        chain = dict.fromkeys(n for qi in qins for n in qi.chain if n in qnodes)  # an input read twice: one copy
        for c in [qnodes[n] for n in chain] + [qn]:
            cc, why = _copy_node(c, k, ren, read, qinits, inits)
            if why:
                break
            new.append(cc)
        outs = [(rev.get(o), ren.get(o)) for o in qn.output if o]
        outs = [(f, loc) for f, loc in outs if f is not None and loc is not None]
        if why or not outs:
            lm.skipped[fnode] = why or "its output has no FP32 counterpart"
            continue
        m.graph.node.extend(new)
        for f, loc in outs:
            lm.pairs[f], lm.nodes[f] = loc, fnode
    m.graph.initializer.extend(inits.values())
    return lm


def _fp32_reader(rev: dict[str, str], tm: TensorMap, m: onnx.ModelProto) -> Callable[[str], str | None]:
    """Q/DQ-model tensor -> the FP32-model tensor a local copy reads; where the Q/DQ model holds it in another
    float dtype (an FP16/BF16 remainder), a Cast of the FP32 tensor to that dtype (added to ``m`` once)."""
    qtypes, ftypes, casts = tm.qdq.tensor_types, tm.fp32.tensor_types, {}

    def read(t: str) -> str | None:
        f = rev.get(t)
        want = qtypes.get(t)
        if f is None or not want or ftypes.get(f, onnx.TensorProto.FLOAT) == want:
            return f
        if (f, want) not in casts:
            out = casts[(f, want)] = f"{f}{SUFFIX}_as{want}"
            m.graph.node.append(onnx.helper.make_node("Cast", [f], [out], name=out, to=want))
        return casts[(f, want)]

    return read


def local_errors(fm: Model, tm: TensorMap, source, *, batch_size: int = 16, limit: int | None = None,
                 optimization: str = "disable", providers: Sequence[str] | None = None,
                 progress: Progress | None = None) -> LocalModel:
    """Local error of every quantized node over the first ``limit`` samples of ``source`` (one pass)."""
    lm = local_model(fm, tm)
    total = min(len(source), limit) if limit is not None else len(source)
    layout = getattr(source, "layout", "batch")
    done = 0
    if progress:
        progress("local error", 0, total)
    with open_runner(lm.proto, lm.outputs, optimization=optimization, providers=providers,
                     name="local error model") as r:
        for ids, feeds, _ in batches(_first(source, total), fm.inputs, batch_size, layout=layout):
            lm.update(r.run(feeds), ids if layout == "batch" else None)
            done += len(ids)
            if progress:
                progress("local error", done, total)
    return lm


def _first(source, n: int):
    for i, s in enumerate(source):
        if i >= n:
            return
        yield s
