"""Atomic file output: write to a temp file beside the target, then ``os.replace``.

A killed process leaves either the previous file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from calib.errors import CalibError

__all__ = ["atomic_path", "write_bytes", "write_text", "write_json", "save_onnx", "ensure_writable_dir"]


def ensure_writable_dir(path: Path) -> None:
    folder = path.parent if path.parent != Path("") else Path(".")
    if path.is_dir():
        raise CalibError(f"{path}: is a folder, expected a file path", hint="name the output file")
    for parent in [folder, *folder.parents]:
        if parent.exists() and not parent.is_dir():
            raise CalibError(f"{path}: cannot write there, {parent} is a file", hint="choose another output path")
    if not folder.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CalibError(f"{path}: cannot create the output folder ({e.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise CalibError(f"{path}: the output folder {folder} is not writable", hint="choose another output path")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    ensure_writable_dir(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=(suffix or path.suffix) + ".tmp",
                               dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def save_onnx(model, path: str | os.PathLike) -> Path:
    """Save an ONNX model atomically (external data is not used: models stay under 2 GB)."""
    return write_bytes(path, model.SerializeToString())
