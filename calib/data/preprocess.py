"""Preprocessing as data: a declarative ``PreprocessSpec`` saved as JSON with every run.

Order of steps (each optional): convert the image to RGB (or grey) -> resize to a
fixed size *or* resize the short side -> centre crop -> to float -> channel order
(RGB/BGR) -> ``x * scale`` -> ``(x - mean) / std`` -> layout (CHW/HWC) -> dtype.
Resizing goes through Pillow with a named resample filter; the new size of a
short-side resize is ``round(side * short / min(w, h))`` (the rounding PaddleClas
and torchvision-style pipelines use).

Images of other modes are converted explicitly: palette, 1-bit, grey, grey+alpha,
RGBA (composited over white, like a page on paper), CMYK and YCbCr. 16-bit and
float images (modes ``I``, ``I;16``, ``F``) are refused: their value range is not
0-255 and a silent rescale would change calibration ranges.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from calib.errors import ConfigError, InputDataError
from calib.io import write_text
from calib.model import InputSpec

__all__ = ["PreprocessSpec", "RESAMPLE", "guess_preprocess", "to_rgb", "check_spec", "stamp_model", "spec_of_model",
           "METADATA_KEY", "IMAGENET_MEAN",
           "IMAGENET_STD", "SPEC_FORMAT_VERSION"]

SPEC_FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
LAYOUTS = ("NCHW", "NHWC")
CHANNELS = ("RGB", "BGR", "L")
DTYPES = ("float32", "float16", "uint8", "int8")
_CONVERTIBLE = {"1", "L", "P", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "PA"}


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes one model input (no batch axis). Sizes are ``(height, width)``."""

    resize: tuple[int, int] | None = None
    resize_short: int | None = None
    resample: str = "bilinear"
    crop: tuple[int, int] | None = None
    layout: str = "NCHW"
    channels: str = "RGB"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    dtype: str = "float32"
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        for name in ("resize", "crop", "mean", "std", "notes"):
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(v))
        self.validate()

    # ---- validation ------------------------------------------------------------
    def validate(self) -> None:
        def bad(msg: str, hint: str | None = None) -> None:
            raise ConfigError(f"preprocessing spec: {msg}", hint=hint)

        if self.resize is not None and self.resize_short is not None:
            bad("give either 'resize' (height, width) or 'resize_short', not both")
        for name in ("resize", "crop"):
            v = getattr(self, name)
            if v is not None and (len(v) != 2 or any(int(d) != d or d < 1 for d in v)):
                bad(f"'{name}' must be two positive integers (height, width), got {v!r}")
        if self.resize_short is not None and (int(self.resize_short) != self.resize_short or self.resize_short < 1):
            bad(f"'resize_short' must be a positive integer, got {self.resize_short!r}")
        if self.resample not in RESAMPLE:
            bad(f"unknown resample '{self.resample}' (known: {', '.join(RESAMPLE)})")
        if self.layout not in LAYOUTS:
            bad(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.channels not in CHANNELS:
            bad(f"channels must be one of {CHANNELS}, got {self.channels!r}")
        if self.dtype not in DTYPES:
            bad(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        n = self.n_channels
        for name in ("mean", "std"):
            v = getattr(self, name)
            if len(v) not in (1, n):
                bad(f"'{name}' has {len(v)} values for {n} channel(s) ({self.channels})")
        if any(s == 0 for s in self.std):
            bad("'std' holds a zero")
        if not np.isfinite(self.scale) or self.scale == 0:
            bad(f"'scale' must be a finite non-zero number, got {self.scale!r}")

    @property
    def n_channels(self) -> int:
        return 1 if self.channels == "L" else 3

    # ---- shapes ----------------------------------------------------------------
    def output_hw(self, image_size: tuple[int, int] | None = None) -> tuple[int | None, int | None]:
        """(height, width) produced; ``None`` where it depends on the image (``image_size`` = (w, h))."""
        if self.crop is not None:
            return self.crop
        if self.resize is not None:
            return self.resize
        if image_size is None:
            return (None, None)
        w, h = image_size
        if self.resize_short is not None:
            w, h = _short_side_size(w, h, self.resize_short)
        return (h, w)

    def output_shape(self, image_size: tuple[int, int] | None = None) -> tuple[int | None, ...]:
        """Shape of one preprocessed sample (no batch axis)."""
        h, w = self.output_hw(image_size)
        c = self.n_channels
        return (c, h, w) if self.layout == "NCHW" else (h, w, c)

    # ---- apply -----------------------------------------------------------------
    def apply(self, image: Image.Image, *, name: str = "image") -> np.ndarray:
        """One image -> one array of ``output_shape`` and ``dtype`` (``name`` appears in errors)."""
        img = to_rgb(image, name=name, grey=self.channels == "L")
        if self.resize is not None:
            h, w = self.resize
            img = img.resize((w, h), RESAMPLE[self.resample])
        elif self.resize_short is not None:
            img = img.resize(_short_side_size(img.width, img.height, self.resize_short), RESAMPLE[self.resample])
        if self.crop is not None:
            ch, cw = self.crop
            if img.height < ch or img.width < cw:
                raise InputDataError(
                    f"{name}: image is {img.height}x{img.width} (h x w) after resizing, smaller than the centre crop "
                    f"{ch}x{cw}", hint="resize to at least the crop size first (resize_short >= crop)")
            top, left = (img.height - ch) // 2, (img.width - cw) // 2
            img = img.crop((left, top, left + cw, top + ch))
        a = np.asarray(img, dtype=np.float32)
        if a.ndim == 2:
            a = a[:, :, None]
        if self.channels == "BGR":
            a = a[:, :, ::-1]
        a = a * np.float32(self.scale)
        a = (a - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.layout == "NCHW":
            a = a.transpose(2, 0, 1)
        if self.dtype in ("uint8", "int8"):
            info = np.iinfo(self.dtype)
            a = np.clip(np.rint(a), info.min, info.max)
        return np.ascontiguousarray(a, dtype=self.dtype)

    def describe(self) -> str:
        """One line: what is done to an image, in order."""
        steps = []
        if self.resize is not None:
            steps.append(f"resize {self.resize[0]}x{self.resize[1]}")
        if self.resize_short is not None:
            steps.append(f"short side {self.resize_short}")
        if steps:
            steps[-1] += f" ({self.resample})"
        if self.crop is not None:
            steps.append(f"centre crop {self.crop[0]}x{self.crop[1]}")
        steps.append(f"{self.channels} {self.layout}")
        steps.append(f"x{self.scale:.6g}")
        if any(self.mean):
            steps.append("mean " + ",".join(f"{v:.4g}" for v in self.mean))
        if any(v != 1.0 for v in self.std):
            steps.append("std " + ",".join(f"{v:.4g}" for v in self.std))
        steps.append(self.dtype)
        return ", ".join(steps)

    # ---- persistence -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("resize", "crop", "mean", "std", "notes"):
            if d[k] is not None:
                d[k] = list(d[k])
        return {"format": "calib.preprocess", "version": SPEC_FORMAT_VERSION, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "preprocessing spec") -> "PreprocessSpec":
        d = dict(d)
        fmt, ver = d.pop("format", "calib.preprocess"), d.pop("version", SPEC_FORMAT_VERSION)
        if fmt != "calib.preprocess" or ver != SPEC_FORMAT_VERSION:
            raise ConfigError(f"{source}: not a calib preprocessing spec (format {fmt!r} version {ver!r})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}", hint=e.hint) from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, text: str, *, source: str = "preprocessing spec") -> "PreprocessSpec":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        return cls.from_dict(d, source=source)

    def save(self, path: str | Path) -> Path:
        return write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "PreprocessSpec":
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: no such preprocessing spec file")
        return cls.from_json(p.read_text(encoding="utf-8"), source=str(p))


def _short_side_size(w: int, h: int, short: int) -> tuple[int, int]:
    """New (w, h) with the short side = ``short``, each side rounded to the nearest pixel."""
    f = float(short) / min(w, h)
    return max(1, int(round(w * f))), max(1, int(round(h * f)))


def to_rgb(image: Image.Image, *, name: str = "image", grey: bool = False) -> Image.Image:
    """Convert any 8-bit image mode to RGB (or L); refuse high-bit-depth modes naming the file."""
    mode = image.mode
    if mode not in _CONVERTIBLE:
        raise InputDataError(
            f"{name}: image mode '{mode}' ({'16-bit' if '16' in mode or mode == 'I' else 'float'} "
            "or unusual pixels) is not supported; expected an 8-bit image (RGB, L, P, RGBA, CMYK, ...)",
            hint="convert the image to 8-bit RGB or greyscale first")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(bg, rgba)
    target = "L" if grey else "RGB"
    return image if image.mode == target else image.convert(target)


def check_spec(spec: PreprocessSpec, inp: InputSpec, *, image_size: tuple[int, int] | None = None) -> None:
    """Raise ``InputDataError`` showing both shapes if ``spec`` cannot feed ``inp``."""
    got = spec.output_shape(image_size)
    want = inp.shape[1:]
    show_got = "(N, " + ", ".join("?" if d is None else str(d) for d in got) + ")"
    show_want = "(" + ", ".join("N" if d is None else str(d) for d in inp.shape) + ")"
    ok = len(got) == len(want) and all(w is None or g == w for g, w in zip(got, want))
    if not ok:
        unknown = any(g is None for g in got)
        raise InputDataError(
            f"preprocessing gives {show_got} but model input '{inp.name}' expects {show_want}",
            hint=("add a centre crop or a fixed resize so every image has the same size" if unknown else
                  "change resize/crop/layout/channels in the preprocessing spec to match the model input"))
    if np.dtype(spec.dtype).kind != np.dtype(inp.dtype).kind:
        raise InputDataError(f"preprocessing gives dtype {spec.dtype} but model input '{inp.name}' expects "
                             f"{np.dtype(inp.dtype)}", hint="set 'dtype' in the preprocessing spec")


def _image_input(model) -> InputSpec | None:
    imgs = [s for s in model.inputs if len(s.shape) == 4]
    return imgs[0] if len(imgs) == 1 and len(model.inputs) == 1 else None


def guess_preprocess(model) -> PreprocessSpec | None:
    """A spec from the model's single 4-D input and its metadata; ``None`` if it is not an image model.

    * metadata key ``calib.preprocess`` (a saved spec as JSON) wins;
    * layout: NCHW if dim 1 is 1 or 3, NHWC if the last dim is;
    * size: a fixed H x W gets the ImageNet evaluation recipe (short side to H * 256/224, centre crop);
    * values: ImageNet mean/std on 0-1 values for float inputs, raw 0-255 for uint8 inputs;
    * channel order: BGR for Paddle exports (PaddleClas/PaddleOCR read images with OpenCV), else RGB.
    The guess is written into ``notes`` so a run shows why it chose what it chose.
    """
    stored = spec_of_model(model.proto)
    if stored is not None:
        return stored
    inp = _image_input(model)
    if inp is None:
        return None
    _, a, b, c = inp.shape
    if a in (1, 3):
        layout, ch, h, w = "NCHW", a, b, c
    elif c in (1, 3):
        layout, ch, h, w = "NHWC", c, a, b
    else:
        return None
    notes = [f"input '{inp.name}' {inp.describe()}: layout {layout}, {ch} channel(s)"]
    paddle = model.proto.producer_name.lower().startswith("paddle") or any(
        d.dim_param.startswith("DynamicDimension") for vi in model.graph.input for d in vi.type.tensor_type.shape.dim)
    channels = "L" if ch == 1 else ("BGR" if paddle else "RGB")
    if ch == 3:
        notes.append("BGR: a Paddle export (images read with OpenCV)" if paddle else "RGB (no sign of a BGR model)")
    resize_short = crop = None
    if h is not None and w is not None:
        resize_short = int(round(min(h, w) * 256 / 224))
        crop = (h, w)
        notes.append(f"short side to {resize_short}, centre crop {h}x{w} (ImageNet evaluation recipe)")
    else:
        notes.append("input size is dynamic: images are used at their own size")
    integer = np.dtype(inp.dtype).kind in "iu"
    if integer:
        scale, mean, std = 1.0, (0.0,) * ch, (1.0,) * ch
        notes.append(f"{np.dtype(inp.dtype)} input: raw 0-255 values")
    elif ch == 3:
        scale, mean, std = 1.0 / 255.0, IMAGENET_MEAN, IMAGENET_STD
        notes.append("values /255 then ImageNet mean/std")
    else:
        scale, mean, std = 1.0 / 255.0, (0.0,), (1.0,)
        notes.append("values /255")
    dtype = str(np.dtype(inp.dtype)) if str(np.dtype(inp.dtype)) in DTYPES else "float32"
    return PreprocessSpec(resize_short=resize_short, resample="lanczos" if paddle else "bilinear", crop=crop,
                          layout=layout, channels=channels, scale=scale, mean=tuple(mean), std=tuple(std),
                          dtype=dtype, notes=tuple(notes))


METADATA_KEY = "calib.preprocess"


def stamp_model(proto, spec: PreprocessSpec | None) -> None:
    """Record ``spec`` in the model's ``metadata_props`` (key ``calib.preprocess``), replacing an older one."""
    if spec is None:
        return
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    for k, v in keep:
        proto.metadata_props.add(key=k, value=v)
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(spec.to_dict(), separators=(",", ":")))


def spec_of_model(proto) -> PreprocessSpec | None:
    """The spec a model carries in its metadata (``stamp_model``), noted as read from there; else None."""
    meta = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in meta:
        return None
    where = f"model metadata '{METADATA_KEY}'"
    spec = PreprocessSpec.from_json(meta[METADATA_KEY], source=where)
    return replace(spec, notes=(f"from the {where}",))
