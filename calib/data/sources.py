"""Image folders and manifests as lazy sources; ``open_source`` picks the source for a path.

* **Image folder**: class = subfolder (``root/<class>/**/*.jpg``), or flat and unlabelled
  (``root/*.jpg``). Class order: the model's class names from its metadata when the folder
  names match them, else numeric order when every name is an integer, else alphabetical.
* **Manifest** (CSV with a header, or JSONL): ``path`` (relative to the manifest's folder),
  optional ``label`` (an integer or a class name) and optional ``split``. With
  ``confine=True`` a row whose file resolves outside the manifest's folder tree is refused.

Only paths are listed up front; each image is opened, preprocessed and closed when the
sample is reached, so a folder of any size is streamed in constant memory. Unreadable
images raise ``InputDataError`` naming the file; with ``skip_bad=True`` they are skipped,
logged and counted in ``source.skipped`` (id -> reason) instead.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Sequence

from calib.data.arrays import NpzSource
from calib.data.base import Source
from calib.data.images import IMAGE_EXTS, ImageFolderSource, ImageSource, class_order, numeric_labels, read_image
from calib.data.preprocess import PreprocessSpec, check_spec, guess_preprocess
from calib.data.tokens import TokenSource
from calib.errors import InputDataError
from calib.model import load_model

__all__ = ["ImageSource", "ImageFolderSource", "ManifestSource", "open_source", "read_image", "IMAGE_EXTS",
           "model_classes", "check_labels", "image_input", "image_setup"]

log = logging.getLogger(__name__)

MANIFEST_EXTS = (".csv", ".jsonl")


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs of a CSV (with header) or JSONL manifest."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputDataError(f"{path}: cannot read manifest ({e})") from None
    rows: list[tuple[int, dict]] = []
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputDataError(f"{path} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise InputDataError(f"{path} line {n}: expected a JSON object, got {type(obj).__name__}")
            rows.append((n, obj))
        return rows
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or "path" not in [f.strip() for f in reader.fieldnames]:
        raise InputDataError(f"{path}: the CSV header has no 'path' column (header: {reader.fieldnames})",
                             hint="the first line must name the columns, e.g. path,label,split")
    for row in reader:
        rows.append((reader.line_num, {k.strip(): (v.strip() if isinstance(v, str) else v)
                                       for k, v in row.items() if k is not None}))
    return rows


class ManifestSource(ImageSource):
    """Images listed in a CSV/JSONL manifest; see the module doc for columns and confinement."""

    def __init__(self, manifest: str | os.PathLike, spec: PreprocessSpec, input_name: str, *,
                 split: str | None = None, confine: bool = False, skip_bad: bool = False,
                 classes: Sequence[str] | None = None) -> None:
        manifest = Path(manifest)
        if not manifest.is_file():
            raise InputDataError(f"{manifest}: no such manifest file")
        base = manifest.parent.resolve()
        rows = _read_rows(manifest)
        if split is not None:
            if rows and not any("split" in r for _, r in rows):
                raise InputDataError(f"{manifest}: has no 'split' column, cannot select split '{split}'")
            have = sorted({str(r.get("split")) for _, r in rows})
            rows = [(n, r) for n, r in rows if str(r.get("split")) == split]
            if not rows:
                raise InputDataError(f"{manifest}: no rows with split '{split}' (splits: {have})")
        if not rows:
            raise InputDataError(f"{manifest}: lists no samples")
        skipped: dict[str, str] = {}
        kept: list[tuple[int, Path, str, object]] = []
        for n, r in rows:
            where = f"{manifest.name} line {n}"
            rel = r.get("path")
            if not isinstance(rel, str) or not rel:
                raise InputDataError(f"{where}: empty 'path'")
            f = (manifest.parent / rel)
            if confine and not _inside(f.resolve(), base):
                raise InputDataError(f"{where}: '{rel}' resolves to {f.resolve()}, outside the manifest's folder "
                                     f"{base}", hint="move the file under the manifest's folder or drop confinement")
            if not f.is_file():
                msg = f"{where}: file '{rel}' does not exist"
                if not skip_bad:
                    raise InputDataError(msg, hint="fix the path or pass --skip-bad to skip missing files")
                skipped[rel] = msg
                log.warning("skipping %s", msg)
                continue
            lab = r.get("label")
            kept.append((n, f, rel, None if lab in (None, "") else lab))
        labelled = [k for k in kept if k[3] is not None]
        if labelled and len(labelled) != len(kept):
            n0 = next(n for n, _, _, lab in kept if lab is None)
            raise InputDataError(f"{manifest.name} line {n0}: no label, while {len(labelled)} of {len(kept)} rows "
                                 "have one", hint="label every row or none")
        order, items = None, []
        if labelled:
            raw = [str(lab) for *_, lab in kept]
            # indices: JSON integers, or digit strings of a CSV; a JSON string such as "90" is a class name
            as_index = all(type(lab) is int for *_, lab in kept) or (manifest.suffix.lower() != ".jsonl"
                                                                      and numeric_labels(raw))
            if classes is None and as_index:
                items = [(f, rel, int(lab)) for _, f, rel, lab in kept]
            else:
                order = class_order(sorted(set(raw)), classes, str(manifest))
                index = {c: k for k, c in enumerate(order)}
                items = [(f, rel, index[str(lab)]) for _, f, rel, lab in kept]
        else:
            items = [(f, rel, None) for _, f, rel, _ in kept]
        super().__init__(items, spec, input_name, skip_bad=skip_bad, classes=order, name=str(manifest))
        self.skipped.update(skipped)
        self.missing = dict(skipped)
        self.manifest = manifest

    def subset(self, indices: Sequence[int]) -> "ManifestSource":
        sub = super().subset(indices)
        return sub  # type: ignore[return-value]


def _inside(p: Path, base: Path) -> bool:
    try:
        p.relative_to(base)
        return True
    except ValueError:
        return False


def model_classes(model) -> list[str] | None:
    """Class names from the model's metadata (``character``/``classes``/``labels``: one per line or JSON list)."""
    if model is None:
        return None
    meta = {p.key: p.value for p in model.proto.metadata_props}
    for key in ("character", "classes", "labels", "names"):
        if key in meta:
            v = meta[key].strip()
            if v.startswith("["):
                try:
                    return [str(x) for x in json.loads(v)]
                except json.JSONDecodeError:
                    pass
            return [s for s in v.splitlines() if s]
    return None


def n_outputs_classes(model) -> int | None:
    """K for a model whose first output is (N, K) with a fixed K (a classifier), else None."""
    if model is None or not model.output_names:
        return None
    shape = model.tensor_shapes.get(model.output_names[0])
    return shape[1] if shape is not None and len(shape) == 2 and shape[1] else None


def check_labels(source, n_classes: int | None) -> None:
    """Refuse labels outside ``[0, n_classes)``, naming the first bad sample."""
    labels = getattr(source, "labels", None)
    if labels is None or n_classes is None:
        return
    ids = source.ids() if hasattr(source, "ids") else None
    for i, lab in enumerate(list(labels)):
        if lab is not None and not 0 <= int(lab) < n_classes:
            sid = ids[i] if ids else f"sample {i}"
            raise InputDataError(f"{sid}: label {int(lab)} does not match the model's {n_classes} classes "
                                 f"(0..{n_classes - 1})", hint="check the label column or the class folders")


def image_input(model) -> str:
    """Name of the model's single 4-D (image) input; ``InputDataError`` otherwise."""
    imgs = [s for s in model.inputs if len(s.shape) == 4]
    if len(model.inputs) != 1 or len(imgs) != 1:
        shown = ", ".join(f"'{s.name}' {s.describe()}" for s in model.inputs)
        raise InputDataError(f"images can feed only a model with one 4-D input; this model has {shown}",
                             hint="save the inputs as an .npz keyed by input name instead")
    return imgs[0].name


def open_source(path_or_spec, model=None, *, spec: PreprocessSpec | str | os.PathLike | None = None,
                split: str | None = None, confine: bool = False, skip_bad: bool = False,
                classes: Sequence[str] | None = None) -> Source:
    """The source for ``.npz``/``.npy`` arrays, a token ``.jsonl``, an image folder or an image manifest.

    ``path_or_spec`` may be a ``Source`` (returned as is) or a path; ``manifest.csv#eval`` selects the
    ``eval`` split. Images need ``model`` (or ``spec`` plus a one-input model) for the input name
    and, without ``spec``, the guessed preprocessing (``guess_preprocess``).
    """
    if not isinstance(path_or_spec, (str, os.PathLike)):
        if isinstance(path_or_spec, Source):
            return path_or_spec
        raise InputDataError(f"cannot open data from a {type(path_or_spec).__name__}")
    text = os.fspath(path_or_spec)
    if "#" in text and not Path(text).exists():
        text, split = text.rsplit("#", 1)[0], text.rsplit("#", 1)[1] or split
    p = Path(text)
    if model is not None and not hasattr(model, "inputs"):
        model = load_model(model)
    suffix = p.suffix.lower()
    if suffix in (".npz", ".npy"):
        src: Source = NpzSource(p, model.inputs if model is not None else None)
        check_labels(_NpzLabels(src), n_outputs_classes(model))
        return src
    if not p.exists():
        raise InputDataError(f"{p}: no such file or folder", hint="check the data path")
    if suffix == ".jsonl" and _is_token_file(p):
        if model is None:
            raise InputDataError(f"{p}: token data needs the model (its input names and sequence length)")
        src = TokenSource(p, model.inputs)
        check_labels(src, n_outputs_classes(model))
        return src
    if not (p.is_dir() or suffix in MANIFEST_EXTS):
        raise InputDataError(f"{p}: unsupported data (expected .npz, .npy, an image folder, or a .csv/.jsonl "
                             "manifest)")
    name, spec = image_setup(model, spec, where=f"{p}: ")
    classes = classes if classes is not None else _matching_classes(p, model)
    if p.is_dir():
        src = ImageFolderSource(p, spec, name, classes=classes, skip_bad=skip_bad)
    else:
        src = ManifestSource(p, spec, name, split=split, confine=confine, skip_bad=skip_bad, classes=classes)
    check_labels(src, n_outputs_classes(model))
    return src


def _matching_classes(p: Path, model) -> list[str] | None:
    """The model's class names, if an image folder's subfolders are among them (else None)."""
    names = model_classes(model)
    if not names or not p.is_dir():
        return None
    subs = [e.name for e in os.scandir(p) if e.is_dir() and not e.name.startswith(".")]
    return names if subs and all(s in names for s in subs) else None


class _NpzLabels:
    def __init__(self, src) -> None:
        self.labels = None if src.labels is None else [int(src.labels[i]) for i in src.indices]
        self._src = src

    def ids(self) -> list[str]:
        return [self._src.sample_id(i) for i in self._src.indices]


def _is_token_file(p: Path) -> bool:
    with open(p, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(obj, dict) and "path" not in obj
    return False


def image_setup(model, spec, where: str = "") -> tuple[str, PreprocessSpec]:
    """The image input's name and the preprocessing spec in use (given, loaded from a path, or guessed),
    checked against the input; ``where`` prefixes the error (e.g. the data path)."""
    if model is None:
        raise InputDataError(f"{where}images need the model (for the input name and the preprocessing)",
                             hint="pass --model")
    name = image_input(model)
    inp = next(s for s in model.inputs if s.name == name)
    if spec is None:
        spec = guess_preprocess(model)
        if spec is None:
            raise InputDataError(f"cannot guess preprocessing for input '{name}' {inp.describe()}",
                                 hint="write a preprocessing spec (JSON) and pass it with --preprocess")
    elif not isinstance(spec, PreprocessSpec):
        spec = PreprocessSpec.load(spec)
    check_spec(spec, inp)
    return name, spec
