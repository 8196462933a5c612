"""Data for ``ctc_rec``: the PP-OCRv4 text-line recogniser of ``rapidocr_onnxruntime`` 1.4.4 (CTC head).

The model is the wheel's ``models/ch_PP-OCRv4_rec_infer.onnx`` (opset 12, upgraded to 17 by prepare.py like
the detector): ``x`` [N, 3, 48, W] -> per-step class probabilities [N, W/8, 6625]. Its character set is in
the model's ``metadata_props['character']`` (one per line); as the package's ``CTCLabelDecode`` does, class 0
is the CTC blank and the last class is the space.

Samples are single text lines rendered with Pillow from real prose (scikit-learn's dataset descriptions and
Debian's licence texts, ``prepare.corpus_text``) in the fonts ``prepare.fonts`` finds (DejaVu/Liberation, or
Pillow's bundled font), so the label is exact by construction: ink and background grey levels, font size,
margins vary; some lines are blurred or noised. Preprocessing is the package's ``resize_norm_img``: BGR, resize
to height 48 keeping the aspect ratio (cv2 bilinear), (x/255 - 0.5)/0.5, right-padded with zeros to W = 320
(the package's ``rec_img_shape``). Lines are built word by word until they would need more than W at height
48, so no line is squeezed.

Labels: the CTC metric needs variable-length class sequences, which a calibration ``.npz`` cannot hold (calib
and the peers accept only the model's inputs and a 1-D integer ``labels``), so they go beside the evaluation
set in ``eval_labels.json`` (``text`` and ``ids`` per sample, in eval.npz's order; every ``eval_<k>.npz`` is a
prefix). ``bench/peers/tools/evaluate.py --task ctc`` reads them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

H, W = 48, 320
MODEL_REL = "models/ch_PP-OCRv4_rec_infer.onnx"


def characters() -> list[str]:
    """The decoder's classes: blank, the model's metadata characters, space (as rapidocr's CTCLabelDecode)."""
    import onnx

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None:
        raise SystemExit("ctc_rec: rapidocr_onnxruntime is not installed in this venv")
    model = onnx.load(str(Path(spec.submodule_search_locations[0]) / MODEL_REL), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if "character" not in meta:
        raise SystemExit("ctc_rec: the model has no 'character' metadata")
    return ["blank", *meta["character"].splitlines(), " "]


def preprocess(bgr: np.ndarray) -> np.ndarray:
    """rapidocr's ``TextRecognizer.resize_norm_img`` for one line at the fixed width W: [3, H, W] float32."""
    import cv2

    h, w = bgr.shape[:2]
    resized_w = min(W, int(np.ceil(H * w / h)))
    img = cv2.resize(bgr, (resized_w, H)).astype(np.float32).transpose(2, 0, 1) / 255
    out = np.zeros((3, H, W), np.float32)
    out[:, :, :resized_w] = (img - 0.5) / 0.5
    return out


def render_line(rng: np.random.Generator, text: str, font, size: int, mx: int, my: int) -> Image.Image:
    """One line of ``text`` on a plain background, its bounding box plus margins mx, my; sometimes blurred."""
    left, top, right, bottom = font.getbbox(text)
    bg = int(rng.integers(190, 256))
    ink = int(rng.integers(0, 90))
    img = Image.new("RGB", (right - left + 2 * mx, bottom - top + 2 * my), (bg, bg, max(bg - int(rng.integers(0, 20)), 0)))
    ImageDraw.Draw(img).text((mx - left, my - top), text, font=font, fill=(ink, ink, ink))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.9)) * size / 32))
    return img


def line_samples(count: int, seed: int, table: dict[str, int], exclude: frozenset = frozenset()) -> tuple[np.ndarray, list[str]]:
    """``count`` distinct rendered lines (preprocessed) and their texts, none of them in ``exclude``."""
    from prepare import add_noise, corpus_text, fonts, load_font

    rng = np.random.default_rng(seed)
    words = [w for para in corpus_text() for w in para.split() if all(c in table for c in w)]
    font_paths = fonts()
    xs = np.empty((count, 3, H, W), np.float32)
    texts: list[str] = []
    seen: set[str] = set()
    while len(texts) < count:
        fpath = font_paths[int(rng.integers(len(font_paths)))]
        size = int(rng.integers(18, 44))
        font = load_font(fpath, size)
        mx, my = int(rng.integers(2, max(3, size // 2))), int(rng.integers(2, max(3, size // 3)))
        limit = rng.uniform(0.6, 1.0) * W / H  # width/height of the line, at most W/H
        start, text = int(rng.integers(len(words))), ""
        for w in words[start : start + 40]:
            cand = f"{text} {w}" if text else w
            left, top, right, bottom = font.getbbox(cand)
            if (right - left + 2 * mx) / (bottom - top + 2 * my) > limit:
                break
            text = cand
        if not text or text in seen or text in exclude:
            continue
        img = render_line(rng, text, font, size, mx, my)
        if img.width / img.height > W / H:
            continue
        arr = np.asarray(img)[:, :, ::-1]  # RGB -> BGR, as cv2.imread gives the package
        if rng.random() < 0.3:
            arr = add_noise(rng, arr, float(rng.uniform(2, 8)))
        xs[len(texts)] = preprocess(np.ascontiguousarray(arr))
        texts.append(text)
        seen.add(text)
    return xs, texts


def build_pool(total: int, n_eval: int) -> tuple[dict, None, dict, dict]:
    """Calibration pool (seed 1) and evaluation set (seed 2, no line text shared with the pool); the
    evaluation labels as a dict (written to eval_labels.json by prepare.py)."""
    chars = characters()
    table = {c: i for i, c in enumerate(chars) if i > 0}
    cx, ctexts = line_samples(total, 1, table)
    ex, texts = line_samples(n_eval, 2, table, exclude=frozenset(ctexts))
    labels = {"text": texts, "ids": [[table[c] for c in t] for t in texts], "classes": len(chars), "space": table[" "]}
    return {"x": cx}, None, {"x": ex}, labels
