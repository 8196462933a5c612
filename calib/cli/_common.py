"""Options and helpers shared by every command module of the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from calib.cli.progress import StageProgress

__all__ = ["Progress", "is_quiet", "set_quiet", "echo", "command_inputs", "command_outputs",
           "external_data_files"]

_state = {"quiet": False}


def set_quiet(quiet: bool) -> None:
    _state["quiet"] = quiet


def is_quiet() -> bool:
    return _state["quiet"]


def echo(msg: str = "") -> None:
    if not _state["quiet"]:
        print(msg)


class Progress(StageProgress):
    """A ``progress(stage, done, total)`` callable: stage headers and one bar per stage on a terminal, a line per
    stage and per 10 % otherwise (``calib.cli.progress``); with --quiet it draws nothing."""

    def __init__(self) -> None:
        super().__init__(quiet=_state["quiet"])


ProgressFn = Callable[[str, int, "int | None"], None]


# ---- inputs a command reads (the output guard refuses to write over any of them) ----------------------------
OUTPUT_PARAMS = frozenset({"output", "cache", "report", "html", "html_path", "stats_out"})
# parameters named like outputs that a command reads instead (build-engine --cache: the cache is read)
INPUT_OVERRIDES = {"build-engine": frozenset({"cache"})}


def command_inputs(command: str, params: dict[str, object]) -> list[Path]:
    """Every file a command reads: its path parameters that are not outputs, with the data path's split
    suffix (``manifest.csv#eval``) dropped and each ONNX model's external-data files added."""
    outputs = OUTPUT_PARAMS - INPUT_OVERRIDES.get(command, frozenset())
    paths: list[Path] = []
    for name, value in params.items():
        if name in outputs:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, str) and name == "data" and "://" not in v:  # collect --data takes a path or a URI
                v = Path(v)
            if isinstance(v, Path):
                p = Path(str(v).partition("#")[0]) if "#" in str(v) else v
                paths.append(p)
                if p.suffix.lower() == ".onnx" and p.is_file():
                    paths.extend(external_data_files(p))
    return paths


def command_outputs(command: str, params: dict[str, object]) -> list[Path]:
    """The output paths a command was given (checked against its inputs before any work)."""
    outputs = OUTPUT_PARAMS - INPUT_OVERRIDES.get(command, frozenset())
    return [v for k, v in params.items() if k in outputs and isinstance(v, Path)]


def external_data_files(model: Path) -> list[Path]:
    """The external-data files an ONNX model names (empty if it cannot be parsed: loading reports that)."""
    import onnx

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception:  # not ONNX: load_model gives the one-line error later
        return []
    tensors = list(proto.graph.initializer) + [a.t for n in proto.graph.node for a in n.attribute if a.HasField("t")]
    out = []
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc:
                out.append(model.parent / loc)
    return out
