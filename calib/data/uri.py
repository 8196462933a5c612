"""Data where it lives: local paths, ``file://`` URIs and any URI fsspec understands (``s3://``, ``gs://``, ...).

* ``file:///data/calib.npz`` (or any ``file://`` URI) is the local path: ``open_data`` as usual.
* A manifest (CSV with a header, or JSONL; local or by URI) whose ``path`` column holds URIs,
  e.g. ``s3://bucket/pages/0001.png``: rows without a scheme are relative to the manifest's
  own folder (or URI). Parsed with pyarrow; ``label`` and ``split`` columns as in ``ManifestSource``.
* A folder by URI (``s3://bucket/pages/``): images at the top (unlabelled) or in class subfolders.

Only the listing is read up front; each image is fetched by whoever iterates the samples (a Ray
worker reads its own shard), so the set is never copied to the driver. A missing or unreadable
file is reported by sample id when it is reached (``skip_bad`` skips and lists it instead);
existence is not checked up front, which would cost one request per row on an object store.
Arrays (``.npz``/``.npy``) must be local paths or ``file://`` URIs (they are read by seeking).

fsspec and pyarrow come with the ``[ray]`` extra; they are imported here only when a URI is used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence
from urllib.parse import unquote, urlparse

from PIL import Image

from calib.data import open_data
from calib.data.base import Source
from calib.data.preprocess import PreprocessSpec
from calib.data.images import class_order, numeric_labels
from calib.data.sources import (IMAGE_EXTS, MANIFEST_EXTS, ImageSource, check_labels, image_setup, n_outputs_classes,
                                read_image)
from calib.errors import InputDataError

__all__ = ["open_data_uri", "is_uri", "UriImageSource", "manifest_rows"]


def is_uri(text: str) -> bool:
    """True for ``scheme://...`` (a one-letter scheme is a Windows drive, not a URI)."""
    scheme = text.split("://", 1)[0] if "://" in text else ""
    return len(scheme) > 1 and scheme.replace("+", "").replace("-", "").replace(".", "").isalnum()


def _local(uri: str) -> str:
    u = urlparse(uri)
    return unquote(u.path) if not u.netloc or u.netloc == "localhost" else f"//{u.netloc}{unquote(u.path)}"


def open_data_uri(path_or_uri, model=None, *, spec: PreprocessSpec | str | os.PathLike | None = None,
                  split: str | None = None, skip_bad: bool = False, classes: Sequence[str] | None = None) -> Source:
    """``open_data`` for local paths, ``file://`` URIs and fsspec URIs (see the module doc)."""
    if not isinstance(path_or_uri, (str, os.PathLike)):
        return open_data(path_or_uri, model)
    text = os.fspath(path_or_uri)
    if "#" in text and not Path(text).exists():
        text, split = text.rsplit("#", 1)[0], text.rsplit("#", 1)[1] or split
    if text.startswith("file://"):
        text = _local(text)
    suffix = Path(urlparse(text).path if is_uri(text) else text).suffix.lower()
    if suffix in MANIFEST_EXTS and (is_uri(text) or Path(text).is_file()):
        rows = manifest_rows(text)
        if is_uri(text) or any(is_uri(str(r.get("path", ""))) for _, r in rows):
            return _uri_manifest(text, rows, model, spec, split, skip_bad, classes)
    if not is_uri(text):
        return open_data(text, model, spec=spec, split=split, skip_bad=skip_bad, classes=classes)
    if suffix in (".npz", ".npy"):
        raise InputDataError(f"{text}: arrays (.npz/.npy) are read from local paths or file:// URIs only",
                             hint="list the samples as images in a manifest, or mount the store")
    return _uri_folder(text, model, spec, skip_bad, classes)


def manifest_rows(uri_or_path: str) -> list[tuple[int, dict]]:
    """(line number, row) pairs of a CSV (with header) or JSONL manifest, read through fsspec + pyarrow."""
    import fsspec  # optional ([ray] extra): only URI data needs it
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    jsonl = uri_or_path.lower().endswith(".jsonl")
    try:
        with fsspec.open(uri_or_path, "rb") as f:
            if jsonl:
                table = pajson.read_json(f)
            else:
                table = pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(
                    column_types={"path": pa.string(), "label": pa.string(), "split": pa.string()}))
    except (OSError, pa.ArrowInvalid) as e:
        raise InputDataError(f"{uri_or_path}: cannot read manifest ({str(e).splitlines()[0]})") from None
    if "path" not in table.column_names:
        raise InputDataError(f"{uri_or_path}: the manifest has no 'path' column (columns: {table.column_names})",
                             hint="the first line must name the columns, e.g. path,label,split")
    first = 1 if jsonl else 2
    return [(first + i, r) for i, r in enumerate(table.to_pylist())]


class UriImageSource(ImageSource):
    """Images by URI (read through fsspec when reached), preprocessed on the fly into one model input."""

    def image(self, i: int) -> Image.Image | None:
        uri, sid, _ = self.items[i]
        try:
            return _read_uri_image(str(uri), sid)
        except InputDataError as e:
            if not self.skip_bad:
                raise
            self._skip(sid, str(e))
            return None


def _read_uri_image(uri: str, sid: str) -> Image.Image:
    import fsspec  # optional ([ray] extra)

    try:
        with fsspec.open(uri, "rb") as f:
            return read_image(f, sid)
    except FileNotFoundError:
        raise InputDataError(f"{sid}: file does not exist ({uri})",
                             hint="fix the path or pass --skip-bad to skip missing files") from None
    except (OSError, ValueError) as e:
        raise InputDataError(f"{sid}: cannot read {uri} ({e})") from None


def _join(base: str, rel: str) -> str:
    if is_uri(rel) or os.path.isabs(rel):
        return rel
    return f"{base.rstrip('/')}/{rel}" if is_uri(base) else str(Path(base) / rel)


def _uri_manifest(text: str, rows: list[tuple[int, dict]], model, spec, split, skip_bad, classes) -> Source:
    name, spec = image_setup(model, spec)
    if split is not None:
        have = sorted({str(r.get("split")) for _, r in rows})
        rows = [(n, r) for n, r in rows if str(r.get("split")) == split]
        if not rows:
            raise InputDataError(f"{text}: no rows with split '{split}' (splits: {have})")
    if not rows:
        raise InputDataError(f"{text}: lists no samples")
    base = text.rsplit("/", 1)[0] if is_uri(text) else str(Path(text).parent)
    kept = []
    for n, r in rows:
        rel = r.get("path")
        if not isinstance(rel, str) or not rel:
            raise InputDataError(f"{text} line {n}: empty 'path'")
        lab = r.get("label")
        kept.append((n, _join(base, rel), rel, None if lab in (None, "") else str(lab)))
    labelled = [k for k in kept if k[3] is not None]
    if labelled and len(labelled) != len(kept):
        n0 = next(n for n, _, _, lab in kept if lab is None)
        raise InputDataError(f"{text} line {n0}: no label, while {len(labelled)} of {len(kept)} rows have one",
                             hint="label every row or none")
    order = None
    if labelled and (classes is not None or not numeric_labels([k[3] for k in kept])):
        order = class_order(sorted({k[3] for k in kept}), classes, text)
    index = {c: i for i, c in enumerate(order or [])}
    items = [(uri, rel, None if lab is None else (index[lab] if order else int(lab))) for _, uri, rel, lab in kept]
    src = UriImageSource(items, spec, name, skip_bad=skip_bad, classes=order, name=text)
    check_labels(src, n_outputs_classes(model))
    return src


def _uri_folder(text: str, model, spec, skip_bad, classes) -> Source:
    import fsspec  # optional ([ray] extra)

    name, spec = image_setup(model, spec)
    fs, root = fsspec.core.url_to_fs(text)
    if not fs.isdir(root):
        raise InputDataError(f"{text}: no such folder or unsupported data",
                             hint="a URI names a folder of images or a .csv/.jsonl manifest")
    root = root.rstrip("/")
    rels = sorted(p[len(root) + 1:] for p in fs.find(root)
                  if Path(p).suffix.lower() in IMAGE_EXTS and not Path(p).name.startswith("."))
    if not rels:
        raise InputDataError(f"{text}: no images found (extensions: {', '.join(sorted(IMAGE_EXTS))})")
    nested = ["/" in r for r in rels]
    if any(nested) and not all(nested):
        raise InputDataError(f"{text}: holds both images and subfolders",
                             hint="use class subfolders only (labelled) or images only (unlabelled)")
    order = class_order(sorted({r.split("/", 1)[0] for r in rels}), classes, text) if all(nested) else None
    index = {c: i for i, c in enumerate(order or [])}
    items = [(fs.unstrip_protocol(f"{root}/{r}"), r, index[r.split("/", 1)[0]] if order else None) for r in rels]
    src = UriImageSource(items, spec, name, skip_bad=skip_bad, classes=order, name=text)
    check_labels(src, n_outputs_classes(model))
    return src
