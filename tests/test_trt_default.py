"""Issue 17 "Done when": the default (TensorRT target, FP16 remainder) `calib quantize` model of every test model,
the cache after a target, and the README's TensorRT section.

References are independent of calib: onnx.checker, ONNX shape inference, ONNX Runtime's run of the FP32 model
(every intermediate tensor) for the FP16-range rule, and typer's own parameter list for the README commands.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from calib.cli import app, main
from calib.export import read_cache
from tests import models

FP16_LIMIT = float(np.finfo(np.float16).max) / 2  # the documented headroom rule (calib.export.precision)
README = Path(__file__).resolve().parent.parent / "README.md"


def _data(name: str, n: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4)
    if name == "cnn_residual":
        return {"x": rng.standard_normal((n, 3, 16, 16)).astype(np.float32)}
    if name == "transformer_block":
        mask = np.ones((n, 6), np.float32)
        mask[:, -2:] = 0
        return {"x": rng.standard_normal((n, 6, 8)).astype(np.float32), "mask": mask}
    if name == "gemm_mlp":
        return {"x": rng.standard_normal((n, 10)).astype(np.float32)}
    if name == "lstm":
        return {"x": rng.standard_normal((n, 5, 4)).astype(np.float32)}
    return {"ids": rng.integers(0, 50, (n, 7)).astype(np.int64)}


def _io(proto):
    return ([(v.name, v.type.tensor_type.elem_type) for v in proto.graph.input],
            [(v.name, v.type.tensor_type.elem_type) for v in proto.graph.output])


def _fp32_max(proto, feeds) -> dict[str, float]:
    """max |x| of every float tensor of the FP32 model on the data (ONNX Runtime, all intermediates as outputs)."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    inferred = onnx.shape_inference.infer_shapes(m).graph
    floats = {v.name for v in list(inferred.value_info) + list(inferred.output) if
              v.type.tensor_type.elem_type == TensorProto.FLOAT}
    names = [o for n in m.graph.node for o in n.output if o in floats]
    del m.graph.output[:]
    m.graph.output.extend([helper.make_empty_tensor_value_info(t) for t in names])
    outs = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(names, feeds)
    got = {t: float(np.max(np.abs(a))) if a.size else 0.0 for t, a in zip(names, outs)}
    got.update({k: float(np.max(np.abs(v))) for k, v in feeds.items() if v.dtype == np.float32})
    got.update({t.name: float(np.max(np.abs(numpy_helper.to_array(t)))) for t in proto.graph.initializer
                if t.data_type == TensorProto.FLOAT})
    return got


@pytest.mark.parametrize("name", ["cnn_residual", "transformer_block", "gemm_mlp", "lstm", "token_embedding"])
def test_default_quantize_is_a_valid_fp16_trt_model(tmp_path, name):
    fp32 = getattr(models, name)()
    mp, data, out = tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "q.onnx"
    models.save(fp32, mp)
    feeds = _data(name)
    np.savez(data, **feeds)
    assert main(["-q", "quantize", str(mp), "--data", str(data), "-o", str(out)]) == 0
    q = onnx.load(str(out))
    onnx.checker.check_model(q, full_check=True)
    assert _io(q) == _io(fp32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)
    want = ort.InferenceSession(fp32.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert [g.dtype for g in got] == [w.dtype for w in want] and all(np.all(np.isfinite(g)) for g in got)
    # FP16 is the remainder: the model holds float16 tensors, and every node left computing in FP32 is on the
    # documented keep-FP32 list: a float tensor or weight beyond 65504/2 in the FP32 model's own run
    assert TensorProto.FLOAT16 in {t.data_type for t in q.graph.initializer}
    g = onnx.shape_inference.infer_shapes(q, strict_mode=True).graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.output) + list(g.input)}
    fp32_nodes = [n for n in g.node if n.op_type not in ("Cast", "QuantizeLinear", "DequantizeLinear")
                  and any(types.get(o) == TensorProto.FLOAT for o in n.output)]
    big = _fp32_max(fp32, feeds)
    orig = {n.name: n for n in fp32.graph.node}
    for n in fp32_nodes:
        assert n.name in orig, n.name
        reach = max(big.get(t, 0.0) for t in list(orig[n.name].input) + list(orig[n.name].output) if t)
        assert reach > FP16_LIMIT, f"{n.name} ({n.op_type}) computes in FP32 but its tensors reach only {reach:g}"
    if name == "transformer_block":  # the float32-min mask is the documented case
        assert {"mask_scores", "softmax"} <= {n.name for n in fp32_nodes}
    else:
        assert fp32_nodes == []


def test_cache_after_a_target_holds_each_scale_and_no_advised_float_input(tmp_path):
    """`quantize --target` (advise keeps nodes float): the cache read back has exactly each activation
    QuantizeLinear's scale of the written model, and no entry for an input of a node the model keeps float."""
    fp32 = models.cnn_residual()
    mp, data, ev, out, cache = (tmp_path / f for f in ("m.onnx", "d.npz", "e.npz", "q.onnx", "q.cache"))
    models.save(fp32, mp)
    rng = np.random.default_rng(9)
    np.savez(data, x=rng.standard_normal((24, 3, 16, 16)).astype(np.float32))
    np.savez(ev, x=rng.standard_normal((16, 3, 16, 16)).astype(np.float32))
    # entropy clips this model's logits (output cosine ~0.7): advise keeps the Gemm float to reach 0.99
    assert main(["-q", "quantize", str(mp), "--data", str(data), "--eval-data", str(ev), "-m", "entropy",
                 "--target", "cosine:0.99", "--max-float-nodes", "2", "-o", str(out), "--cache", str(cache)]) == 0
    q = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    made_by = {o: n for n in q.graph.node for o in n.output}
    scales = {}
    for n in q.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
            src = n.input[0]
            while src in made_by and made_by[src].op_type == "Cast":
                src = made_by[src].input[0]
            scales[src] = np.float32(inits[n.input[1]])
    dq_fed = {n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    advised = json.loads((tmp_path / "q.advice.json").read_text())["exclude"]
    assert advised, "advise kept at least one node float (the case exercises the rule)"
    float_nodes = [n for n in q.graph.node if n.name in advised]
    assert float_nodes and not any(i in dq_fed for n in float_nodes for i in n.input)  # float in the model too
    ranges = read_cache(cache)
    for t, s in scales.items():
        assert np.float32(ranges[t].amax / 127) == s, t
    orig = {n.name: n for n in fp32.graph.node}
    for n in float_nodes:
        for t in orig[n.name].input:
            if t not in {i.name for i in fp32.graph.initializer} and t not in scales:
                assert t not in ranges, f"{t} feeds '{n.name}', kept float; TensorRT 10 would run it in INT8"


def _readme_section() -> str:
    text = README.read_text()
    start = text.index("## Deploying on TensorRT 10 and 11")
    end = text.index("\n## ", start + 5)
    return text[start:end]


def test_readme_tensorrt_section_says_what_was_verified_and_its_commands_exist():
    sec = _readme_section()
    assert "What was verified, and what was not" in sec and "No TensorRT engine has ever been built" in sec
    assert "unverified" in sec  # the trtexec 11 flags not found in a primary source are marked
    import typer.main

    group = typer.main.get_command(app)
    cmds = [ln.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", sec, re.S)
            for ln in block.replace("\\\n", " ").splitlines() if ln.strip().startswith("calib ")]
    assert len(cmds) >= 8
    for line in cmds:
        words = shlex.split(line)
        cmd = group.commands[words[1]]
        known = {o for p in cmd.params for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
        flags = [w.split("=")[0] for w in words[2:] if w.startswith("-")]
        assert set(flags) <= known, (line, set(flags) - known)
