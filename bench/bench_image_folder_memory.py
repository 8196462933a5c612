"""Benchmark: streaming a folder of 10,000 images keeps memory flat.

Generates N small JPEGs (class subfolders) into a temp folder, then iterates an
``ImageFolderSource`` through ``batches`` (as ``collect`` does), sampling the process's
resident memory (``/proc/self/statm``) every 500 images. Writes a markdown table with
machine and command to ``bench/results/image_folder_memory.md``.

Run: ``python bench/bench_image_folder_memory.py [--n 10000]``
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calib.data.base import batches  # noqa: E402
from calib.data.preprocess import PreprocessSpec  # noqa: E402
from calib.data.sources import ImageFolderSource  # noqa: E402
from calib.io import write_text  # noqa: E402
from calib.model import InputSpec  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_images(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    for i in range(n):
        d = root / str(i % 4)
        d.mkdir(exist_ok=True)
        a = np.roll(base, i % 97, axis=1)
        Image.fromarray(a).save(d / f"img_{i:05d}.jpg", quality=80)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "image_folder_memory.md"))
    a = p.parse_args()
    spec = PreprocessSpec(resize_short=256, resample="bilinear", crop=(224, 224))
    inputs = [InputSpec("x", (None, 3, 224, 224), np.dtype(np.float32))]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        make_images(Path(tmp), a.n)
        t_gen = time.perf_counter() - t0
        src = ImageFolderSource(tmp, spec, "x")
        rows = [(0, rss_mb())]
        t0 = time.perf_counter()
        done = 0
        for ids, feeds, _ in batches(src, inputs, 16):
            done += len(ids)
            if done % 500 == 0 or done == len(src):
                rows.append((done, rss_mb()))
        t_iter = time.perf_counter() - t0
    after_first = [r for r in rows if r[0] >= 500]
    growth = after_first[-1][1] - after_first[0][1]
    lines = [
        "# Image folder streaming: resident memory vs images read",
        "",
        f"- command: `python bench/bench_image_folder_memory.py --n {a.n}`",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, Python "
        f"{platform.python_version()}, Pillow {Image.__version__}",
        f"- {a.n} JPEGs of 400x300 in 4 class folders (generated in {t_gen:.1f} s); preprocessing: short side 256, "
        f"centre crop 224, batches of 16 ({t_iter:.1f} s, {a.n / t_iter:.0f} images/s)",
        f"- RSS growth from image 500 to image {a.n}: **{growth:+.1f} MB** (one batch of 16 float32 inputs is "
        f"{16 * 3 * 224 * 224 * 4 / 2**20:.1f} MB)",
        "",
        "| images read | RSS (MB) |",
        "|---:|---:|",
        *[f"| {n} | {m:.1f} |" for n, m in rows],
        "",
    ]
    write_text(a.out, "\n".join(lines))
    print("\n".join(lines[:6]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
