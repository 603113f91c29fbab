"""Train the demo model that ships with edgeopt: a tiny MobileNetV3-style CNN on digits.

Data: scikit-learn's ``load_digits`` (1797 8x8 grayscale images, pixel values
0..16, scaled to [0, 1]), split with ``train_test_split(test_size=0.25,
random_state=0, stratify=y)``. The network has every block edgeopt must
handle on real models: a stem conv, depthwise convs, BatchNorm, ReLU6 and
hardswish, a squeeze-and-excitation block with a hardsigmoid gate, residual
adds, global average pooling and a Linear classifier.

Training is deterministic (fixed seeds, one thread, deterministic kernels)
and takes well under a minute on a laptop CPU. Augmentation: random shifts of
up to one pixel. The exported ONNX model is evaluated in ONNX Runtime on the
test split and that accuracy is what ``demo.json`` records.

Writes, into ``src/edgeopt/assets/`` (or ``--out-dir``):

* ``demo.onnx``: opset 17, input ``input`` float32 [1,1,8,8] -> output
  ``logits`` float32 [1,10]; BatchNormalization nodes kept (not folded).
* ``digits_test.npz``: ``x`` float32 [N,1,8,8], ``y`` int64 [N], the test split.
* ``demo.json``: test accuracy, sample counts, seed, torch version.

Usage: ``python scripts/train_demo.py [--epochs 60] [--seed 0] [--out-dir DIR]``
(needs the ``train`` extra: torch and scikit-learn).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "src" / "edgeopt" / "assets"
MIN_TEST_ACCURACY = 0.97


def conv_bn(cin: int, cout: int, kernel: int, *, stride: int = 1, groups: int = 1, act=None):
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """Channel attention: x * hardsigmoid(W2 relu(W1 avgpool(x)))."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.expand = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.expand(F.relu(self.reduce(s))))


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> SE -> 1x1 project, plus the input."""

    def __init__(self, channels: int, expanded: int, act):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(channels, expanded, 1, act=act),
            conv_bn(expanded, expanded, 3, groups=expanded, act=act),
            SqueezeExcite(expanded, expanded // 4),
            conv_bn(expanded, channels, 1),
        )

    def forward(self, x):
        return x + self.body(x)


class DigitsNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(1, 16, 3, act=nn.ReLU6),  # 8x8
            InvertedResidual(16, 32, nn.ReLU6),
            conv_bn(16, 16, 3, stride=2, groups=16, act=nn.Hardswish),  # 4x4 depthwise
            conv_bn(16, 32, 1, act=nn.Hardswish),
            InvertedResidual(32, 64, nn.Hardswish),
        )
        self.classifier = nn.Linear(32, classes)

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def load_split(seed: int):
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)


def random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to one pixel in each direction, zero-filled."""
    padded = F.pad(x, (1, 1, 1, 1))
    offsets = torch.randint(0, 3, (x.shape[0], 2), generator=generator)
    return torch.stack([padded[i, :, dy:dy + 8, dx:dx + 8] for i, (dy, dx) in enumerate(offsets.tolist())])


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x_train, y_train = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=1e-4)
    batches_per_epoch = -(-len(x) // 32)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=4e-3, total_steps=epochs * batches_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 32):
            index = order[start:start + 32]
            logits = model(random_shift(x_train[index], generator))
            loss = F.cross_entropy(logits, y_train[index], label_smoothing=0.05)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()


def export(model: nn.Module, path: pathlib.Path) -> None:
    """TorchScript exporter at opset 17, keeping BatchNormalization unfolded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation of the TorchScript exporter
        torch.onnx.export(
            model, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, opset_version=17,
            input_names=["input"], output_names=["logits"], do_constant_folding=True,
            training=torch.onnx.TrainingMode.PRESERVE,
        )
    proto = onnx.load(str(path))
    proto.producer_name = "edgeopt scripts/train_demo.py"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def onnx_accuracy(path: pathlib.Path, x: np.ndarray, y: np.ndarray) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    predictions = [int(np.argmax(session.run(None, {"input": image[None]})[0])) for image in x]
    return float(np.mean(np.asarray(predictions) == y))


CALIBRATION_SAMPLES = 256


def write_calibration(x_train: np.ndarray, path: pathlib.Path) -> None:
    """The first CALIBRATION_SAMPLES training images (stacked, float32): the demo's int8 calibration data."""
    np.save(path, np.ascontiguousarray(x_train[:CALIBRATION_SAMPLES], dtype=np.float32), allow_pickle=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=pathlib.Path, default=ASSETS)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    x_train, x_test, y_train, y_test = load_split(0)
    model = DigitsNet()
    started = time.perf_counter()
    train(model, x_train, y_train, epochs=args.epochs, seed=args.seed)
    train_seconds = time.perf_counter() - started

    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out_dir) as staging:
        staging = pathlib.Path(staging)
        export(model, staging / "demo.onnx")
        accuracy = onnx_accuracy(staging / "demo.onnx", x_test, y_test)
        if accuracy < MIN_TEST_ACCURACY:
            raise SystemExit(f"test accuracy {accuracy:.4f} < {MIN_TEST_ACCURACY}; assets not written")
        np.savez_compressed(staging / "digits_test.npz", x=x_test, y=y_test)
        write_calibration(x_train, staging / "digits_calib.npy")
        summary = {
            "test_accuracy": round(accuracy, 6),
            "train_samples": int(len(y_train)),
            "test_samples": int(len(y_test)),
            "seed": args.seed,
            "epochs": args.epochs,
            "torch_version": torch.__version__,
        }
        (staging / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
        for name in ("demo.onnx", "digits_test.npz", "digits_calib.npy", "demo.json"):
            os.replace(staging / name, args.out_dir / name)
    print(f"trained in {train_seconds:.1f} s; test accuracy (onnxruntime) {accuracy:.4f}")


if __name__ == "__main__":
    main()
