"""Engine check kit: files and a trtexec line to check a TensorRT engine built from a Q/DQ model,
and a reader for trtexec's ``--exportLayerInfo`` JSON.

No TensorRT runs here: everything below is written from TensorRT's documented
formats (TENSORRT.md; the flags marked unverified there are marked so here).

Data files (``write_kit``): one file per graph input and per graph output,
``<name>.bin`` (the tensor name with ``/``, ``:`` and spaces replaced by ``_``):
the raw bytes of a C-contiguous (row-major) array, little-endian, no header, in
the tensor's ONNX dtype (float32: 4 bytes, float16: 2, int64: 8, int32: 4,
int8/uint8/bool: 1). All samples form one batch along axis 0; the shapes are in
``kit.json`` and in the ``--shapes`` of the printed line. Read one back with
``np.fromfile(path, dtype='<f4').reshape(shape)``; this is how trtexec's
``--loadInputs=name:file`` fills an input buffer (bytes copied as they are).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from calib.data.base import batches
from calib.errors import CalibError, InputDataError
from calib.export.groups import FusionGroup, group_index
from calib.io import write_bytes, write_json
from calib.model import Model
from calib.runtime import make_session

__all__ = ["write_kit", "trtexec_check_line", "EngineLayer", "read_layer_info", "parse_layer_info",
           "layer_report", "UNVERIFIED_FLAGS"]

# Flags of trtexec 11.1 that TENSORRT.md does not list (no primary source read): check `trtexec --help`.
UNVERIFIED_FLAGS = ("--loadRefOutputs", "--accuracyAlgorithm", "--accuracyThreshold")
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def _file_name(tensor: str) -> str:
    return _SAFE.sub("_", tensor).strip("_") + ".bin"


def _save_raw(path: Path, arr: np.ndarray) -> Path:
    a = np.ascontiguousarray(arr)
    return write_bytes(path, a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())


def _gather(source: Iterable, model: Model, limit: int) -> dict[str, np.ndarray]:
    taken = []
    for s in source:
        taken.append(s)
        if len(taken) >= limit:
            break
    if not taken:
        raise InputDataError("the evaluation data holds no sample")
    feeds = next(batches(taken, model.inputs, len(taken)))[1]
    return feeds


def write_kit(model: Model, source: Iterable, out_dir: str | os.PathLike, *, reference: Model | None = None,
              limit: int = 8, model_path: str | os.PathLike = "model.int8.onnx",
              accuracy_threshold: float = 0.01) -> dict[str, Any]:
    """Write inputs and reference outputs (ONNX Runtime CPU run of ``reference``, default ``model``) for
    ``limit`` samples into ``out_dir``; returns the kit description (also written as ``kit.json``)."""
    out = Path(out_dir)
    feeds = _gather(source, model, limit)
    ref = reference or model
    sess = make_session(ref.proto, ["cpu"])
    names = [o.name for o in sess.get_outputs()]
    q_outputs = [o.name for o in model.graph.output]
    if sorted(names) != sorted(q_outputs):
        raise CalibError(f"the reference model's outputs {names} are not the model's {q_outputs}")
    results = dict(zip(names, sess.run(names, feeds)))
    kit: dict[str, Any] = {"format": "calib-trt-check/1", "byte_order": "little", "layout": "row-major, batch axis 0",
                           "samples": int(next(iter(feeds.values())).shape[0]), "inputs": [], "outputs": []}
    for key, arrays in (("inputs", feeds), ("outputs", results)):
        for name, arr in arrays.items():
            f = _file_name(name)
            _save_raw(out / f, arr)
            kit[key].append({"name": name, "file": f, "dtype": str(arr.dtype), "shape": list(arr.shape)})
    kit["trtexec"] = trtexec_check_line(model_path, kit, out, threshold=accuracy_threshold)
    write_json(out / "kit.json", kit)
    return kit


def trtexec_check_line(model_path: str | os.PathLike, kit: Mapping[str, Any], out_dir: str | os.PathLike, *,
                       threshold: float = 0.01, algorithm: str = "cosine") -> list[str]:
    """The trtexec 11.1 lines: build + run on the kit's inputs, compare with the reference, export layer info."""
    q, d = shlex.quote, Path(out_dir)
    spec = lambda items: ",".join(f"'{i['name']}':{q(str(d / i['file']))}" for i in items)  # noqa: E731
    shapes = ",".join(f"'{i['name']}':{'x'.join(map(str, i['shape']))}" for i in kit["inputs"])
    cmd = ["trtexec", f"--onnx={q(str(model_path))}", f"--saveEngine={q(str(d / 'model.engine'))}",
           f"--shapes={shapes}", f"--loadInputs={spec(kit['inputs'])}",
           f"--loadRefOutputs={spec(kit['outputs'])}", f"--accuracyAlgorithm={algorithm}",
           f"--accuracyThreshold={threshold:g}", "--profilingVerbosity=detailed",
           f"--exportLayerInfo={q(str(d / 'layers.json'))}", f"--exportOutput={q(str(d / 'outputs.json'))}"]
    return ["# TensorRT 11.1 (strongly typed: no --stronglyTyped/--int8/--fp16 needed; the ONNX types decide)",
            "# unverified spellings (not in calib's TensorRT notes; check `trtexec --help`): "
            + " ".join(UNVERIFIED_FLAGS),
            " ".join(cmd),
            "# TensorRT 10.x: add --stronglyTyped (drop the three unverified flags if trtexec rejects them)",
            f"# then: calib trt-check --layer-info {q(str(d / 'layers.json'))} --model {q(str(model_path))}"]


# ---------------------------------------------------------------- layer info


@dataclass
class EngineLayer:
    name: str
    layer_type: str
    precision: str  # INT8 | FP16 | BF16 | FP32 | FP8 | INT32 | ... (from its tensors' Format/Datatype)
    onnx_nodes: list[str] = field(default_factory=list)

    @property
    def reformat(self) -> bool:
        return self.layer_type.lower() in ("reformat", "reformatting") or "Reformatting CopyNode" in self.name


_PRECISIONS = [("int8", "INT8"), ("fp8", "FP8"), ("bfloat16", "BF16"), ("bf16", "BF16"), ("half", "FP16"),
               ("fp16", "FP16"), ("int32", "INT32"), ("int64", "INT64"), ("bool", "BOOL"), ("float", "FP32"),
               ("fp32", "FP32")]
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")


def _precision(fmt: str) -> str:
    low = fmt.lower()
    return next((p for key, p in _PRECISIONS if key in low), "UNKNOWN")


def parse_layer_info(doc: Any, *, source: str = "layer info") -> list[EngineLayer]:
    """Layers of an ``--exportLayerInfo`` document (``{"Layers": [...], "Bindings": [...]}``, detailed verbosity)."""
    layers = doc.get("Layers") if isinstance(doc, dict) else None
    if not isinstance(layers, list):
        raise CalibError(f"{source}: no 'Layers' list; expected trtexec --exportLayerInfo JSON")
    out = []
    for i, lay in enumerate(layers):
        if not isinstance(lay, dict):
            raise CalibError(f"{source}: layer {i} is {type(lay).__name__}, not an object; rebuild with "
                             "--profilingVerbosity=detailed")
        ins = [_precision(str(t.get("Format/Datatype", ""))) for t in lay.get("Inputs") or [] if isinstance(t, dict)]
        outs = [_precision(str(t.get("Format/Datatype", ""))) for t in lay.get("Outputs") or [] if isinstance(t, dict)]
        # a layer reading or writing INT8 (a fused DQ -> Conv, a Q at its output) computes in INT8
        prec = "INT8" if "INT8" in ins + outs else "FP8" if "FP8" in ins + outs else \
            next(iter(outs + ins), "UNKNOWN")
        meta = str(lay.get("Metadata", ""))
        nodes = _ONNX_LAYER.findall(meta)
        out.append(EngineLayer(str(lay.get("Name", f"layer{i}")), str(lay.get("LayerType", "")), prec,
                               [n.strip() for n in nodes]))
    return out


def read_layer_info(path: str | os.PathLike) -> list[EngineLayer]:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CalibError(f"{path}: cannot read layer info ({e})") from None
    return parse_layer_info(doc, source=str(path))


def _islands(layers: Sequence[EngineLayer]) -> list[list[str]]:
    """Runs of consecutive FP32 compute layers (reformats and non-float layers end nothing, they are skipped)."""
    runs, cur = [], []
    for lay in layers:
        if lay.reformat or lay.precision in ("INT32", "INT64", "BOOL", "UNKNOWN"):
            continue
        if lay.precision == "FP32":
            cur.append(lay.name)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def layer_report(layers: Sequence[EngineLayer], groups: Sequence[FusionGroup] | None = None) -> dict[str, Any]:
    """Precision split, FP32 islands, reformat layers and, with calib's groups, each group's precisions."""
    counts: dict[str, int] = {}
    for lay in layers:
        if not lay.reformat:
            counts[lay.precision] = counts.get(lay.precision, 0) + 1
    doc: dict[str, Any] = {
        "layers": len(layers), "precision_counts": counts,
        "fp32_islands": _islands(layers), "reformat_layers": [lay.name for lay in layers if lay.reformat],
        "by_layer": [{"name": lay.name, "type": lay.layer_type, "precision": lay.precision,
                      "onnx_nodes": lay.onnx_nodes} for lay in layers]}
    if groups is not None:
        idx = group_index(groups)
        per: dict[str, dict[str, Any]] = {}
        for lay in layers:
            for n in lay.onnx_nodes:
                g = idx.get(n)
                if g is None:
                    continue
                e = per.setdefault(g.anchor, {"kind": g.kind, "nodes": list(g.nodes), "precisions": [], "layers": []})
                if lay.precision not in e["precisions"]:
                    e["precisions"].append(lay.precision)
                if lay.name not in e["layers"]:
                    e["layers"].append(lay.name)
        doc["groups"] = per
        doc["groups_split"] = [a for a, e in per.items() if len(e["layers"]) > 1]
        doc["groups_unseen"] = [g.anchor for g in groups if g.anchor not in per]
    return doc
