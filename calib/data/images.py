"""Images as lazy samples: ``read_image`` (one file, named in errors), ``ImageSource`` (a list of
(path, id, label) read and preprocessed on demand) and ``ImageFolderSource`` (class = subfolder).

Only paths are listed up front; each image is opened, preprocessed and closed when the sample
is reached. See ``calib.data.sources`` for the class-order rules and ``open_source``.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Iterator, Sequence

from PIL import Image, UnidentifiedImageError

from calib.data.base import Sample
from calib.data.preprocess import PreprocessSpec
from calib.errors import InputDataError

__all__ = ["IMAGE_EXTS", "read_image", "ImageSource", "ImageFolderSource", "class_order", "numeric_labels"]

log = logging.getLogger(__name__)

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"})


def read_image(path: Path, name: str) -> Image.Image:
    """Open and fully decode one image (the file is closed on return); errors name ``name``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return im.copy()  # decoded pixels outlive the closed file
    except FileNotFoundError:
        raise InputDataError(f"{name}: file does not exist ({path})") from None
    except UnidentifiedImageError:
        raise InputDataError(f"{name}: not an image Pillow can read ({path})",
                             hint="remove the file or pass --skip-bad to skip unreadable images") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputDataError(f"{name}: cannot decode image ({str(e).strip() or type(e).__name__})",
                             hint="the file may be truncated or corrupt; re-export it or pass --skip-bad") from None


class ImageSource:
    """Images listed by path (with optional labels), preprocessed on the fly into one model input."""

    layout = "batch"

    def __init__(self, items: Sequence[tuple[Path, str, int | None]], spec: PreprocessSpec, input_name: str, *,
                 skip_bad: bool = False, classes: Sequence[str] | None = None, name: str = "images") -> None:
        self.items = list(items)  # (file, id, label)
        self.spec = spec
        self.input_name = input_name
        self.skip_bad = skip_bad
        self.classes = list(classes) if classes is not None else None
        self.name = name
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.items)

    def ids(self) -> list[str]:
        return [i for _, i, _ in self.items]

    @property
    def labels(self) -> list[int | None]:
        return [lab for _, _, lab in self.items]

    def subset(self, indices: Sequence[int]) -> "ImageSource":
        sub = object.__new__(type(self))
        sub.__dict__.update(self.__dict__)
        sub.items = [self.items[int(i)] for i in indices]
        sub.skipped = {}
        return sub

    def image(self, i: int) -> Image.Image | None:
        """The decoded image of item ``i`` (``None`` if unreadable and ``skip_bad``)."""
        path, sid, _ = self.items[i]
        try:
            return read_image(path, sid)
        except InputDataError as e:
            if not self.skip_bad:
                raise
            self._skip(sid, str(e))
            return None

    def _skip(self, sid: str, reason: str) -> None:
        if sid not in self.skipped:
            log.warning("skipping %s", reason)
        self.skipped[sid] = reason

    def __iter__(self) -> Iterator[Sample]:
        for i, (_, sid, label) in enumerate(self.items):
            img = self.image(i)
            if img is None:
                continue
            try:
                x = self.spec.apply(img, name=sid)
            except InputDataError as e:
                if not self.skip_bad:
                    raise
                self._skip(sid, str(e))
                continue
            finally:
                img.close()
            yield Sample(sid, {self.input_name: x}, label)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} images)"


def numeric_labels(names: Sequence[str]) -> bool:
    return all(n.lstrip("-").isdigit() for n in names)


def class_order(found: Sequence[str], classes: Sequence[str] | None, where: str) -> list[str]:
    if classes is not None:
        unknown = [f for f in found if f not in classes]
        if unknown:
            raise InputDataError(f"{where}: class '{unknown[0]}' is not one of the model's classes "
                                 f"{list(classes)}", hint="rename the folder/label or pass the right class list")
        return list(classes)
    return sorted(found, key=int) if numeric_labels(found) else sorted(found)


class ImageFolderSource(ImageSource):
    """``root/<class>/**/<image>`` (labelled) or ``root/<image>`` (unlabelled), in sorted path order."""

    def __init__(self, root: str | os.PathLike, spec: PreprocessSpec, input_name: str, *,
                 classes: Sequence[str] | None = None, skip_bad: bool = False) -> None:
        root = Path(root)
        if not root.is_dir():
            raise InputDataError(f"{root}: no such folder")
        top = sorted((e for e in os.scandir(root) if not e.name.startswith(".")), key=lambda e: e.name)
        files = [Path(e.path) for e in top if e.is_file() and Path(e.name).suffix.lower() in IMAGE_EXTS]
        dirs = [e.name for e in top if e.is_dir()]
        items: list[tuple[Path, str, int | None]] = []
        if files and dirs:
            raise InputDataError(f"{root}: holds both images and subfolders ({dirs[0]}/)",
                                 hint="use class subfolders only (labelled) or images only (unlabelled)")
        if files:
            items = [(f, f.name, None) for f in files]
            order = None
        else:
            per_class = {d: sorted(_walk_images(root / d)) for d in dirs}
            per_class = {d: fs for d, fs in per_class.items() if fs}
            if not per_class:
                raise InputDataError(f"{root}: no images found (extensions: {', '.join(sorted(IMAGE_EXTS))})")
            order = class_order(list(per_class), classes, str(root))
            index = {c: k for k, c in enumerate(order)}
            for d in sorted(per_class, key=lambda c: index[c]):
                items += [(f, f.relative_to(root).as_posix(), index[d]) for f in per_class[d]]
        super().__init__(items, spec, input_name, skip_bad=skip_bad, classes=order, name=str(root))
        self.root = root


def _walk_images(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in filenames if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTS]
    return out
