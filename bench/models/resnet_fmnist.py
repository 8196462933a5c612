"""Recipe: a small ResNet trained on Fashion-MNIST on the CPU, exported to ONNX.

Real trained weights, made offline: the data is Debian's ``dataset-fashion-mnist`` package
(``apt-get install -y dataset-fashion-mnist``: /usr/share/datasets/fashion-mnist/*-ubyte.gz).
Runs in the ``prep`` venv (torch CPU). Writes ``bench/.work/models/resnet_fmnist.onnx`` and a JSON
beside it with the test accuracy and the training time. Deterministic seed; a few minutes on 2 cores.

    bench/.venvs/prep/bin/python bench/models/resnet_fmnist.py [--epochs 1] [--train-samples 25600]
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
WORK = Path(__file__).resolve().parents[1] / ".work" / "models"
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel mean / std (of x/255)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format: big-endian header, then uint8 data)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return images as float32 [N,1,28,28] normalised as the model expects, and int64 labels."""
    prefix = "train" if split == "train" else "t10k"
    if not (FMNIST_DIR / f"{prefix}-images-idx3-ubyte.gz").exists():
        raise SystemExit(f"Fashion-MNIST not found in {FMNIST_DIR}: run `apt-get install -y dataset-fashion-mnist`")
    images = read_idx(FMNIST_DIR / f"{prefix}-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    labels = read_idx(FMNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return ((images - MEAN) / STD)[:, None, :, :], labels


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.short is None else self.short(x)))


class SmallResNet(nn.Module):
    """ResNet-style: a 3x3 stem at 28x28, then three stages of two residual blocks (16, 32, 64 channels at
    14x14, 7x7, 4x4; the first block of each stage strides by 2 with a 1x1 projection shortcut), global
    average pooling, Linear. Small enough to train on 2 CPU cores in minutes."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layers = nn.Sequential(
            Block(16, 16, 2), Block(16, 16, 1), Block(16, 32, 2), Block(32, 32, 1), Block(32, 64, 2), Block(64, 64, 1)
        )
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        y = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-samples", type=int, default=25600, help="random training images used per epoch")
    ap.add_argument("--out", type=Path, default=WORK / "resnet_fmnist.onnx")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    xtr, ytr = load_split("train")
    xte, yte = load_split("test")
    model = SmallResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    per_epoch = min(args.train_samples, len(xtr)) // 128
    steps = args.epochs * per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    model.train()
    for epoch in range(args.epochs):
        order = rng.permutation(len(xtr))
        for i in range(per_epoch):
            idx = order[i * 128 : (i + 1) * 128]
            xb = torch.from_numpy(xtr[idx])
            if rng.random() < 0.5:  # horizontal flip augmentation
                xb = torch.flip(xb, dims=[3])
            loss = nn.functional.cross_entropy(model(xb), torch.from_numpy(ytr[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        pred = np.concatenate([model(torch.from_numpy(xte[i : i + 500])).argmax(1).numpy() for i in range(0, len(xte), 500)])
    acc = float((pred == yte).mean())
    print(f"test accuracy {acc:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp.onnx")
    torch.onnx.export(
        model, torch.from_numpy(xte[:1]), str(tmp), input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False,
    )
    tmp.replace(args.out)
    info = {"test_accuracy_fp32_torch": acc, "train_s": train_s, "epochs": args.epochs, "torch": torch.__version__}
    args.out.with_suffix(".json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
