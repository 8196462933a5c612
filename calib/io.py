"""File output and input guards shared by every writer and reader.

Output: write to a temp file beside the target, then ``os.replace``; a killed process leaves either the
previous file or the new one, never half of one. Every write first passes :func:`check_output`, which refuses
a path that resolves (through ``..``, symlinks or hard links) to one of the inputs registered with
:func:`protect_inputs`. A device, FIFO or other special file is written directly, never renamed over. New files
honour the umask; a replaced file keeps its mode.

Input: :func:`npy_header` and :func:`read_npz` check an ``.npy``/``.npz``'s declared shape x itemsize against
the bytes actually there and against a limit *before* reading, so a small file cannot declare a huge array.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import json
import os
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

import numpy as np

from calib.errors import CalibError, InputDataError

__all__ = ["sha256_file", "atomic_path", "write_bytes", "write_text", "write_json", "save_onnx", "ensure_writable_dir",
           "protect_inputs", "check_output", "npy_header", "read_npz", "NpyHeader", "MAX_ARRAY_BYTES"]

MAX_ARRAY_BYTES = 1 << 36  # 64 GiB: no calibration array is larger; anything declaring more is refused

_PROTECTED: contextvars.ContextVar[tuple[tuple[str, tuple[int, int] | None, str], ...]] = \
    contextvars.ContextVar("calib_protected_inputs", default=())
_WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOENT,
                 errno.ENOTDIR, errno.EISDIR}


# ---- output guard ---------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike, h=None) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks; with ``h`` (a hashlib object) feeds it instead."""
    h = h if h is not None else hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _identity(path: str | os.PathLike) -> tuple[str, tuple[int, int] | None]:
    real = os.path.realpath(os.path.abspath(os.fspath(path)))
    try:
        st = os.stat(real)
        return real, (st.st_dev, st.st_ino)
    except OSError:
        return real, None


@contextlib.contextmanager
def protect_inputs(paths: Iterable[str | os.PathLike]) -> Iterator[None]:
    """While active, every write through this module refuses a path that is one of ``paths``."""
    entries = [(*_identity(p), str(p)) for p in paths]
    token = _PROTECTED.set(_PROTECTED.get() + tuple(entries))
    try:
        yield
    finally:
        _PROTECTED.reset(token)


def check_output(path: str | os.PathLike) -> None:
    """Raise ``InputDataError`` if writing ``path`` would overwrite a protected input."""
    real, ident = _identity(path)
    for in_real, in_ident, shown in _PROTECTED.get():
        if real == in_real or (ident is not None and ident == in_ident):
            raise InputDataError(f"{path}: refusing to write over an input ({shown})",
                                 hint="choose an output path that is not one of the command's inputs")


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


def _new_file_mode(path: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)  # replacing: keep the file's mode
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def _is_special(path: Path) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def _write_error(path: Path, e: OSError) -> CalibError:
    return CalibError(f"{path}: cannot write ({e.strerror or e})", hint="choose a writable output path")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    A special file (``/dev/null``, a FIFO) is yielded itself: it is written directly, never replaced.
    """
    path = Path(path)
    check_output(path)
    if _is_special(path):
        try:
            yield path
        except OSError as e:
            if e.errno in _WRITE_ERRNOS:
                raise _write_error(path, e) from None
            raise
        return
    ensure_writable_dir(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=(suffix or path.suffix) + ".tmp",
                                   dir=path.parent if str(path.parent) else ".")
        os.fchmod(fd, _new_file_mode(path))
        os.close(fd)
    except OSError as e:
        raise _write_error(path, e) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            raise _write_error(path, e) from None
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                os.fsync(f.fileno())
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def save_onnx(model, path: str | os.PathLike) -> Path:
    """Save an ONNX model atomically (external data is not used: models stay under 2 GB)."""
    return write_bytes(path, model.SerializeToString())


# ---- input-size guard -------------------------------------------------------------------------------------
class NpyHeader:
    """A validated ``.npy`` header: shape, dtype, order, and where the data starts."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, fortran: bool, offset: int) -> None:
        self.shape, self.dtype, self.fortran, self.offset = shape, dtype, fortran, offset
        self.nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize if shape else dtype.itemsize


def npy_header(f: IO[bytes], where: str, *, size: int | None, max_bytes: int = MAX_ARRAY_BYTES) -> NpyHeader:
    """Read and check an ``.npy`` header from ``f``; ``size`` is the bytes the array has (None: unknown).

    Refuses object dtypes, negative dimensions, and a declared size above ``max_bytes`` or ``size``.
    """
    try:
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f, max_header_size=1 << 16)
                                 if version == (1, 0) else
                                 np.lib.format.read_array_header_2_0(f, max_header_size=1 << 16))
    except (ValueError, SyntaxError, TypeError, EOFError, zipfile.BadZipFile, OSError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputDataError(f"{where} has a bad .npy header ({why})") from None
    if dtype.hasobject:
        raise InputDataError(f"{where} holds Python objects, which calib refuses to unpickle",
                             hint="save plain numeric arrays")
    if any(int(d) < 0 for d in shape):
        raise InputDataError(f"{where}: the .npy header declares a negative dimension {tuple(shape)}")
    h = NpyHeader(tuple(int(d) for d in shape), dtype, bool(fortran), f.tell())
    if h.nbytes > max_bytes:
        raise InputDataError(f"{where} declares {h.nbytes} bytes (shape {h.shape}), more than the limit "
                             f"of {max_bytes} bytes")
    if size is not None and h.offset + h.nbytes > size:
        raise InputDataError(f"{where} is truncated (header declares shape {h.shape}, {h.nbytes} bytes; "
                             f"the file holds {max(size - h.offset, 0)})")
    return h


def read_npz(path: str | os.PathLike, *, max_member_bytes: int = MAX_ARRAY_BYTES,
             max_total_bytes: int = MAX_ARRAY_BYTES) -> dict[str, np.ndarray]:
    """Every array of an ``.npz``, each header checked (and the total against a limit) before any is read."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
            heads = {}
            for info in infos:
                with zf.open(info) as f:
                    heads[info.filename] = npy_header(f, f"{path}: array '{_key(info.filename)}'",
                                                      size=info.file_size, max_bytes=max_member_bytes)
            total = sum(h.nbytes for h in heads.values())
            if total > max_total_bytes:
                raise InputDataError(f"{path}: declares {total} bytes of arrays, more than the limit of "
                                     f"{max_total_bytes}")
            out = {}
            for info in infos:
                h = heads[info.filename]
                with zf.open(info) as f:
                    f.seek(h.offset) if f.seekable() else f.read(h.offset)
                    buf = f.read(h.nbytes)
                if len(buf) != h.nbytes:
                    raise InputDataError(f"{path}: array '{_key(info.filename)}' is truncated")
                a = np.frombuffer(buf, dtype=h.dtype)
                out[_key(info.filename)] = a.reshape(h.shape, order="F" if h.fortran else "C")
            return out
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, ValueError) as e:
        if isinstance(e, CalibError):
            raise
        raise InputDataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise InputDataError(f"{path}: cannot read ({e.strerror or e})") from None


def _key(member: str) -> str:
    return member[:-4] if member.endswith(".npy") else member
