"""``--preprocess SPEC.json`` and the one line every image-reading command prints about the spec in use."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import typer

from calib.cli._common import echo
from calib.data.preprocess import PreprocessSpec, guess_preprocess
from calib.model import load_model

__all__ = ["PREPROCESS_HELP", "load_spec", "show_spec", "spec_line", "resolve_spec", "preprocess_option"]

_MANIFESTS = (".csv", ".jsonl", ".json", ".txt")

PREPROCESS_HELP = ("Image preprocessing spec (JSON: resize/resize_short, crop, layout, channels, scale, mean, std, "
                   "dtype). Default: guessed from the model, and the guess is printed.")


def preprocess_option() -> Any:
    return typer.Option(None, "--preprocess", help=PREPROCESS_HELP)


def load_spec(path: Optional[Path]) -> PreprocessSpec | None:
    """The spec of ``--preprocess`` (None when not given); a bad file is a ConfigError naming it."""
    if path is None:
        return None
    spec = PreprocessSpec.load(path)
    return replace(spec, notes=(f"from {path}",))


def spec_line(spec: PreprocessSpec, what: str = "images") -> str:
    why = "; ".join(spec.notes) if spec.notes else "as given"
    if spec.notes and not spec.notes[0].startswith("from "):
        why = "guessed: " + why
    return f"preprocess ({what}): {spec.describe()}  [{why}]"


def show_spec(source: Any, what: str = "images") -> PreprocessSpec | None:
    """Print the spec ``source`` applies (image folders and manifests carry one); returns it."""
    spec = getattr(source, "spec", None)
    if isinstance(spec, PreprocessSpec):
        echo(spec_line(spec, what))
        return spec
    return None


def resolve_spec(model_path: Path, data: Path, given: Optional[Path], what: str = "calibration data"
                 ) -> PreprocessSpec | None:
    """The spec a command will apply to image ``data`` (``--preprocess``, else the model's guess), printed.

    None for array data (.npz/.npy) or a model that does not take images.
    """
    spec = load_spec(given)
    base = Path(str(data).split("#", 1)[0])
    if spec is None and (base.is_dir() or base.suffix.lower() in _MANIFESTS):
        spec = guess_preprocess(load_model(model_path))
    if spec is not None:
        echo(spec_line(spec, what))
    return spec
