"""Fold BatchNormalization into the preceding Conv (for the ONNX Runtime placement).

ONNX Runtime fuses Conv+BatchNormalization only while the Conv weight is a
float initializer; once the weight sits behind a DequantizeLinear the BN stays a
separate float op between DQ and Q and breaks the int8 chain. ONNX Runtime's
``quant_pre_process`` folds it before quantizing; calib does the same for the
``ort`` placement. TensorRT fuses BN itself, so the ``trt`` placement keeps it.
"""

from __future__ import annotations

import logging

import onnx
from onnx import numpy_helper

from calib.graph import attr, fold_bn

__all__ = ["fold_batchnorm"]

log = logging.getLogger(__name__)


def fold_batchnorm(proto: onnx.ModelProto) -> list[str]:
    """Fold ``Conv -> BatchNormalization`` pairs in place; return the Conv output tensors removed.

    A pair folds when the Conv output feeds only the BN, is not a graph output,
    the Conv weight (and bias) are initializers used by no other node, and the
    BN parameters are initializers. The folded Conv writes the BN's output
    tensor, so every tensor name after the BN stays as it was.
    """
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = {}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    removed: list[str] = []
    drop_nodes: set[int] = set()
    for conv in g.node:
        if conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[1] not in inits:
            continue
        y = conv.output[0]
        cs = consumers.get(y, [])
        if len(cs) != 1 or y in outputs or cs[0].op_type != "BatchNormalization":
            continue
        bn = cs[0]
        if len(bn.output) != 1 or not all(t in inits for t in bn.input[1:5]):
            continue
        w_name = conv.input[1]
        b_name = conv.input[2] if len(conv.input) > 2 and conv.input[2] else ""
        if uses.get(w_name, 0) != 1 or (b_name and (b_name not in inits or uses.get(b_name, 0) != 1)):
            continue
        w = numpy_helper.to_array(inits[w_name])
        bn_params = (numpy_helper.to_array(inits[t]) for t in bn.input[1:5])
        b = numpy_helper.to_array(inits[b_name]) if b_name else None
        w_f, b_f = fold_bn(w, b, *bn_params, float(attr(bn, "epsilon", 1e-5)))
        inits[w_name].CopyFrom(numpy_helper.from_array(w_f, w_name))
        if b_name:
            inits[b_name].CopyFrom(numpy_helper.from_array(b_f, b_name))
        else:
            b_name = f"{w_name}_folded_bias"
            while b_name in inits:
                b_name += "_"
            t = numpy_helper.from_array(b_f, b_name)
            g.initializer.append(t)
            inits[b_name] = t
            conv.input.append(b_name)
        removed.append(y)
        conv.output[0] = bn.output[0]
        drop_nodes.add(id(bn))
    if drop_nodes:
        _drop(g, drop_nodes, removed)
        log.debug("folded %d BatchNormalization nodes into Conv", len(removed))
    return removed


def _drop(g: onnx.GraphProto, drop_nodes: set[int], removed: list[str]) -> None:
    """Remove the folded BN nodes, the initializers (and their graph inputs) nothing reads any more, and the
    value_info of the removed Conv outputs."""
    keep = [n for n in g.node if id(n) not in drop_nodes]
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in g.node for i in n.input}
    gone_init = {t.name for t in g.initializer if t.name not in used}
    keep_init = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep_init)
    keep_in = [v for v in g.input if v.name not in gone_init]
    del g.input[:]
    g.input.extend(keep_in)
    keep_vi = [v for v in g.value_info if v.name not in set(removed)]
    del g.value_info[:]
    g.value_info.extend(keep_vi)
