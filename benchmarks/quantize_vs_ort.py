"""edgeopt's int8 quantizer next to ONNX Runtime's ``quantize_static``, in one run.

Models: the bundled digits demo CNN and the torch architectures of
``tests/models.py`` (MobileNetV2/V3-, EfficientNet-, ResNet-style CNNs and a
transformer encoder), each trained for a few epochs on scikit-learn's digits
(the 8x8 images upsampled bilinearly: to 3x32x32 for the CNNs, to a 16x32
sequence for the transformer) and exported to ONNX. Trained models are cached
in ``benchmarks/.cache/`` keyed by name, seed and epochs.

Plus two realistic-size CNNs at 1x3x224x224, written here in torch (no
torchvision): ``resnet18_224`` (ResNet-18: 7x7 stem + max-pool, basic blocks
64-128-256-512, 1000-class FC) and ``mobilenet_v2_224`` (MobileNetV2 1.0,
ReLU6 inverted residuals). They are not trained (no labelled data of that size
ships in a package): seeded He-initialized weights, trained-looking BatchNorm
affine params (``tests/models.py``'s ``_randomize_normalization``) and running
statistics estimated on image-like inputs, so BN folding is not a no-op
(depthwise kernels get a per-channel mean, see ``_init_weights``). They
are measured on fidelity only: output SQNR and top-1 agreement with the float
model on 32 held-out smooth image-like inputs (low-resolution noise upsampled
to 224, deterministic from the seed), and again on 512 (those 32 plus 480 more
from a stream of their own); 64 other such inputs calibrate. To keep
a full run short they get fewer settings (edgeopt minmax + percentile, ORT
MinMax + Percentile after ``quant_pre_process``) and 30 latency runs. The
latency target (int8 >= 1.5x faster than fp32) is judged on these two only.

For every model and every quantizer setting, in a fresh process each:

* edgeopt: ``edgeopt.quantize(model_path, Int8Config(calibration=M), data,
  output=...)`` (what ``edgeopt quantize`` runs, without the fidelity and
  speed checks that follow it) for each calibration method M (per-channel int8
  weights, uint8 activations: the ORT target's defaults);
* ONNX Runtime: ``quantize_static(QDQ, per_channel=True, uint8 activations,
  int8 weights)`` for each ``CalibrationMethod``, on the exported model and on
  the model after ORT's recommended ``quant_pre_process``.

Both get the same calibration samples (``--calib-samples`` drawn with
``--seed`` from the digits training split, batch 1) and import the same
libraries before the clock starts. Measured:

* accuracy on the digits test split (450 images) and its drop in points from
  the float model (trained models); output SQNR (dB) and top-1 agreement with
  the float model (all models);
* the same on larger evaluation sets, in a table and checks of their own, since
  the sets above are small enough for noise to decide (one test image is 0.22
  points, one of the 32 held-out inputs 3.1 points of agreement): each of the
  450 test images in its 9 one-pixel shifts (padded by one zero pixel, all nine
  8x8 windows: 4,050 labelled images, one = 0.025 points) for the trained
  models; 512 held-out inputs (one = 0.2 points) for the 224x224 models. Each
  larger set starts with its small set, whose logits are reused; inference is
  batched where the model's batch dimension is free (the exports here fix 1);
* wall time of load + calibrate + quantize + save (ORT's ``quant_pre_process``
  runs once beforehand, outside that time, and is reported separately), in a
  process that has imported both tools and frozen their objects out of the
  garbage collector before the clock starts;
* peak RSS of the quantizing process (Linux's ``VmHWM``: ``ru_maxrss`` carries the parent's over);
* int8 latency in ONNX Runtime (median, one intra-op thread): each quantized
  model timed interleaved with the float model by ``edgeopt.bench`` (the bytes
  each tool wrote, unmodified), so "vs fp32" is a within-pair ratio.

Time and RSS are the least of ``--repeats`` interleaved runs of each setting.

The targets of the quantizer issue are then checked for edgeopt's default
setting and its most accurate one: accuracy against ORT's most accurate
setting, on the small sets and again on the larger ones (there "most accurate",
for both tools, is chosen on the larger set); time and memory against ORT's run
with the same calibration method (else ORT's most accurate); latency against ORT's recommended flow
(``quant_pre_process`` + ``quantize_static``) with the same method (else
MinMax). The latency phase runs pinned to one core.

Run from the repository root (``tests.models`` must be importable)::

    python benchmarks/quantize_vs_ort.py [--models demo,resnet,resnet18_224] [--calib-samples 200]
        [--runs 200] [--seed 0] [--quick] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import pathlib
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    REPO_ROOT,
    WORKER_RESULT_PREFIX,
    digits_split,
    environment,
    environment_markdown,
    markdown_table,
    peak_rss_mb,
    prepare_cache_dir,
    publish,
    run_worker,
)

SCRIPT = pathlib.Path(__file__).resolve()
# Realistic-size CNNs at 1x3x224x224, untrained (seeded weights, data-estimated BatchNorm
# statistics): measured on fidelity to the float model, and where the latency target is judged.
FIDELITY_MODELS = ("resnet18_224", "mobilenet_v2_224")
ALL_MODELS = ("demo", "mobilenet_v2", "mobilenet_v3", "efficientnet", "resnet", "transformer", *FIDELITY_MODELS)
CONV_MODELS = frozenset(ALL_MODELS) - {"transformer"}
# the int8 >= 1.5x fp32 target is judged here; the 32x32 models run in ~0.1 ms, where per-op
# overhead dominates, and their ratios are shown for information
LATENCY_TARGET_MODELS = frozenset(FIDELITY_MODELS)
ORT_METHODS = ("MinMax", "Entropy", "Percentile", "Distribution")
EDGEOPT_METHODS = ("minmax", "percentile", "entropy", "mse", "auto")
# edgeopt method -> ORT method with the same algorithm (for time/memory pairs)
SAME_METHOD = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
TRAIN_EPOCHS = {"mobilenet_v2": 20, "mobilenet_v3": 20, "efficientnet": 20, "resnet": 15, "transformer": 40}
TEST_FEEDS_FOR_LATENCY = 16
# limits for the 224x224 models, so a full run stays within ~15 minutes on 2 cores
FIDELITY_EDGEOPT_METHODS = ("minmax", "percentile")
FIDELITY_ORT_METHODS = ("MinMax", "Percentile")  # after quant_pre_process only
FIDELITY_CALIB_SAMPLES = 64
FIDELITY_EVAL_SAMPLES = 32
FIDELITY_RUNS = 30
FIDELITY_BN_SAMPLES = 32  # images whose batch statistics become the BatchNorm running statistics
FIDELITY_BUILD_VERSION = 2  # bump when the builders or the data below change (cache key)
# the larger evaluation sets, with a table and checks of their own: every test image in each of its 9
# one-pixel shifts (windows of the zero-padded image, the unshifted (1, 1) first), and for the 224x224
# models 480 held-out inputs more (smooth_images stream 3; 1 calibrates, 2 holds out the 32)
SHIFT_WINDOWS = ((1, 1), *((dy, dx) for dy in range(3) for dx in range(3) if (dy, dx) != (1, 1)))
FIDELITY_EXTRA_SAMPLES = 480
BATCH_INPUT_BYTES = 16 << 20  # input per run of batched inference (models with a free batch dimension)


# ---------------------------------------------------------------- settings and results


@dataclass(frozen=True)
class Setting:
    tool: str  # "edgeopt" or "ort"
    method: str  # edgeopt CalibrationMethod value or ORT CalibrationMethod name
    preprocessed: bool = False  # ORT only: quant_pre_process ran first

    @property
    def label(self) -> str:
        return f"{self.method} + pre-process" if self.preprocessed else self.method

    @property
    def stem(self) -> str:
        return f"{self.tool}-{self.method.lower()}{'-prep' if self.preprocessed else ''}"


@dataclass
class Row:
    setting: Setting
    path: pathlib.Path | None = None
    error: str | None = None
    wall_s: float | None = None
    peak_rss_mb: float | None = None
    baseline_rss_mb: float | None = None
    accuracy: float | None = None
    agreement: float | None = None
    sqnr_db: float | None = None
    latency_ms: float | None = None
    relative: float | None = None  # int8 / fp32 median latency, timed as a pair
    # on the larger evaluation set (Case.ext_x)
    ext_accuracy: float | None = None
    ext_agreement: float | None = None
    ext_sqnr_db: float | None = None
    ext_error: str | None = None
    # top-1 class of every input, on the test set and on the larger set (paired comparisons)
    top1: np.ndarray | None = field(default=None, repr=False)
    ext_top1: np.ndarray | None = field(default=None, repr=False)


@dataclass
class Case:
    """One architecture: its float model, data, and everything measured on it."""

    name: str
    fp32_path: pathlib.Path
    input_name: str
    calib: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray | None  # None: untrained model, measured on fidelity to the float model only
    train_s: float | None = None
    build_s: float | None = None  # untrained models: build, estimate BN statistics, export
    prep_path: pathlib.Path | None = None
    prep_s: float | None = None
    float_accuracy: float = float("nan")
    float_latency_ms: float | None = None
    float_logits: np.ndarray | None = field(default=None, repr=False)
    rows: list[Row] = field(default_factory=list)
    # the larger evaluation set: test_x followed by more inputs (shifted test images, or more held-out inputs)
    ext_x: np.ndarray | None = field(default=None, repr=False)
    ext_y: np.ndarray | None = field(default=None, repr=False)
    ext_float_logits: np.ndarray | None = field(default=None, repr=False)
    ext_float_accuracy: float = float("nan")
    ext_s: float = 0.0  # building the extra inputs and running every model on them

    @property
    def fidelity_only(self) -> bool:
        return self.test_y is None


# ---------------------------------------------------------------- worker (one quantization)


def _import_both_tools() -> None:
    """Import what either tool needs, so both workers start from the same baseline RSS."""
    import onnx  # noqa: F401
    import onnx_ir  # noqa: F401
    import onnxruntime  # noqa: F401
    import onnxruntime.quantization  # noqa: F401

    import edgeopt.api
    import edgeopt.io  # noqa: F401
    import edgeopt.quant  # noqa: F401

    for name in edgeopt.api.__all__:  # the API imports its modules on first use: load them all now, untimed
        getattr(edgeopt.api, name)


def _quantize_ort(payload: dict, feeds: list[dict]) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(feeds)

        def get_next(self):
            return next(self._feeds, None)

    quantize_static(payload["model"], payload["output"], Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod[payload["method"]])


def _quantize_edgeopt(payload: dict, feeds: list[dict]) -> None:
    from edgeopt import api
    from edgeopt.quant import CalibrationMethod, Int8Config

    # `edgeopt quantize MODEL --data D -o OUT` without the fidelity and speed checks that follow
    # (model path in, file out, as ORT's quantize_static is called)
    api.quantize(payload["model"], Int8Config(calibration=CalibrationMethod(payload["method"])), feeds,
                 output=payload["output"], check_fidelity=False, check_speed=False)


def worker_main(payload: dict) -> None:
    """Quantize one model with one setting; report wall time and peak RSS as JSON."""
    _import_both_tools()
    calib = np.load(payload["calib"])
    feeds = [{payload["input"]: calib[i:i + 1]} for i in range(len(calib))]
    # The imported libraries' objects (about 80,000) are never garbage, but a full collection walks them
    # all (about 40 ms here), and where one falls depends on allocation counts since start-up: inside
    # either tool's timed region or outside, at random. Both tools are timed with them frozen out.
    gc.collect()
    gc.freeze()
    baseline = peak_rss_mb()
    quantize = _quantize_ort if payload["tool"] == "ort" else _quantize_edgeopt
    start = time.perf_counter()
    try:
        quantize(payload, feeds)
    except Exception as error:  # reported in the table, the benchmark goes on
        traceback.print_exc()
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        result = {"error": f"{type(error).__name__}: {message}"[:300]}
    else:
        result = {"wall_s": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(),
                  "baseline_rss_mb": baseline}
    print(WORKER_RESULT_PREFIX + json.dumps(result), flush=True)


# ---------------------------------------------------------------- models and data


def _to_model_input(name: str, images: np.ndarray) -> np.ndarray:
    """Digits [N,1,8,8] -> the architecture's input: 3x32x32 (CNNs) or a 16x32 sequence."""
    if name == "demo":
        return images
    import torch
    from torch.nn import functional as F

    tensor = torch.from_numpy(images)
    if name == "transformer":
        return F.interpolate(tensor, size=(16, 32), mode="bilinear", align_corners=False)[:, 0].numpy()
    return F.interpolate(tensor, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1).numpy()


def _random_shift(images, generator):
    """Shift each 8x8 image by up to one pixel in each direction, zero-filled (train_demo.py's augmentation)."""
    import torch
    from torch.nn import functional as F

    padded = F.pad(images, (1, 1, 1, 1))
    offsets = torch.randint(0, 3, (images.shape[0], 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + 8, dx:dx + 8] for i, (dy, dx) in enumerate(offsets)])


def all_shifts(images: np.ndarray) -> np.ndarray:
    """Each 8x8 image in its 9 one-pixel shifts, zero-filled (every window of ``_random_shift``),
    window-major in ``SHIFT_WINDOWS`` order: the unshifted images first."""
    padded = np.pad(images, ((0, 0), (0, 0), (1, 1), (1, 1)))
    return np.concatenate([padded[:, :, dy:dy + 8, dx:dx + 8] for dy, dx in SHIFT_WINDOWS])


def _train(name: str, x_train: np.ndarray, y_train: np.ndarray, *, seed: int, epochs: int):
    """A fresh ``tests.models`` architecture trained on digits with fixed seeds (AdamW, one-cycle)."""
    import torch
    from torch.nn import functional as F

    from tests.models import TORCH_MODELS

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    module = TORCH_MODELS[name][0]()
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    batch = 64
    steps = epochs * -(-len(x) // batch)
    lr = 1e-3 if name == "transformer" else 4e-3
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    module.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            index = order[start:start + batch]
            inputs = torch.from_numpy(_to_model_input(name, _random_shift(x[index], generator).numpy()))
            loss = F.cross_entropy(module(inputs), y[index], label_smoothing=0.05)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return module.eval()


def _trained_onnx(name: str, seed: int, x_train: np.ndarray, y_train: np.ndarray) -> tuple[pathlib.Path, float]:
    """The cached trained export of ``name`` (trained now if missing) and its training seconds."""
    import torch

    from tests.models import TORCH_MODELS, export_onnx

    epochs = TRAIN_EPOCHS[name]
    cache = prepare_cache_dir()
    path = cache / f"{name}-seed{seed}-e{epochs}-torch{torch.__version__}.onnx"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        return path, json.loads(meta.read_text())["train_s"]
    print(f"[{name}] training {epochs} epochs on digits ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    module = _train(name, x_train, y_train, seed=seed, epochs=epochs)
    train_s = time.perf_counter() - start
    staging = path.with_suffix(".tmp.onnx")
    export_onnx(module, (torch.zeros(*TORCH_MODELS[name][1]),), staging)
    staging.replace(path)
    meta.write_text(json.dumps({"train_s": train_s, "epochs": epochs, "seed": seed}))
    return path, train_s


# ---------------------------------------------------------------- realistic-size models (224x224)


def _init_weights(module) -> None:
    """torchvision's initialization of ResNet/MobileNetV2 (He-normal fan-out convs, small FC), plus a
    per-channel mean on depthwise kernels.

    Trained depthwise 3x3 kernels are largely smoothing or contrast filters with a non-zero mean;
    zero-mean random ones cancel on smooth inputs, the BatchNorm estimated after them then scales
    their near-zero outputs by up to 200x, and the untrained MobileNetV2's output becomes nearly
    independent of the input (5 distinct top-1 classes over 32 inputs, instead of ~20 with the mean).
    """
    import torch
    from torch import nn

    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.groups > 1 and m.groups == m.in_channels:
                with torch.no_grad():
                    m.weight.add_(0.3 * torch.randn(m.weight.shape[0], 1, 1, 1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def resnet18_224():
    """ResNet-18: 7x7/2 stem + 3x3/2 max-pool, 2+2+2+2 basic blocks of 64-128-256-512, 1000-class FC."""
    from torch import nn

    from tests.models import BasicBlock, ConvBNAct, _Classifier

    layers, cin = [ConvBNAct(3, 64, 7, 2, act="relu"), nn.MaxPool2d(3, stride=2, padding=1)], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout)]
        cin = cout
    return _Classifier(nn.Sequential(*layers), nn.Linear(512, 1000))


def mobilenet_v2_224():
    """MobileNetV2 1.0: inverted residuals with ReLU6, the paper's (t, c, n, s) table, 1280-d head."""
    from torch import nn

    from tests.models import ConvBNAct, InvertedResidual, _Classifier

    layers, cin = [ConvBNAct(3, 32, 3, 2, act="relu6")], 32
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(n):
            layers.append(InvertedResidual(cin, cin * t, c, stride=s if i == 0 else 1, act="relu6"))
            cin = c
    layers.append(ConvBNAct(cin, 1280, 1, act="relu6"))
    return _Classifier(nn.Sequential(*layers), nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000)))


def mobilenet_v3_224():
    """MobileNetV3-Large: the paper's (kernel, expansion, out, SE, activation, stride) table, hardswish from
    the fifth stage on, SE gates of hardsigmoid; 960-d last conv, 1280-d hardswish head. Not among ALL_MODELS
    (``benchmarks/hardswish.py`` measures it)."""
    from torch import nn

    from tests.models import ConvBNAct, InvertedResidual, SqueezeExcite, _Classifier

    def se(channels):
        return SqueezeExcite(channels, max(8, channels // 4), act="relu", gate="hardsigmoid")

    layers, cin = [ConvBNAct(3, 16, 3, 2, act="hardswish")], 16
    for k, expanded, c, gated, act, s in (
            (3, 16, 16, 0, "relu", 1), (3, 64, 24, 0, "relu", 2), (3, 72, 24, 0, "relu", 1),
            (5, 72, 40, 1, "relu", 2), (5, 120, 40, 1, "relu", 1), (5, 120, 40, 1, "relu", 1),
            (3, 240, 80, 0, "hardswish", 2), (3, 200, 80, 0, "hardswish", 1), (3, 184, 80, 0, "hardswish", 1),
            (3, 184, 80, 0, "hardswish", 1), (3, 480, 112, 1, "hardswish", 1), (3, 672, 112, 1, "hardswish", 1),
            (5, 672, 160, 1, "hardswish", 2), (5, 960, 160, 1, "hardswish", 1), (5, 960, 160, 1, "hardswish", 1)):
        layers.append(InvertedResidual(cin, expanded, c, kernel=k, stride=s, act=act, se=se if gated else None))
        cin = c
    layers.append(ConvBNAct(cin, 960, 1, act="hardswish"))
    head = nn.Sequential(nn.Linear(960, 1280), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(1280, 1000))
    return _Classifier(nn.Sequential(*layers), head)


FIDELITY_BUILDERS = {"resnet18_224": resnet18_224, "mobilenet_v2_224": mobilenet_v2_224,
                     "mobilenet_v3_224": mobilenet_v3_224}


def smooth_images(count: int, seed: int, stream: int) -> np.ndarray:
    """``count`` image-like [3,224,224] inputs, ImageNet-normalized in scale: a sum of
    low-resolution Gaussian noise at 4x4, 14x14 and 56x56, upsampled bilinearly
    (large smooth regions plus some texture), colour channels correlated, a random
    brightness and contrast per image, clipped to the normalized-RGB range.
    Deterministic in (seed, stream); distinct streams give disjoint sets."""
    import torch
    from torch.nn import functional as F

    rng = np.random.default_rng([seed, stream])
    image = np.zeros((count, 3, 224, 224), np.float32)
    for size, amplitude in ((4, 1.0), (14, 0.6), (56, 0.3)):
        shared = rng.standard_normal((count, 1, size, size))
        own = rng.standard_normal((count, 3, size, size))
        noise = torch.from_numpy((0.8 * shared + 0.6 * own).astype(np.float32))
        image += amplitude * F.interpolate(noise, size=(224, 224), mode="bilinear", align_corners=False).numpy()
    image /= image.std()
    contrast = rng.uniform(0.6, 1.4, (count, 1, 1, 1))
    brightness = rng.normal(0.0, 0.4, (count, 3, 1, 1))
    return np.ascontiguousarray(np.clip(contrast * image + brightness, -2.1, 2.6), dtype=np.float32)


def _estimate_batchnorm(module, images: np.ndarray) -> None:
    """Replace every BatchNorm's running statistics by the batch statistics of ``images``
    (cumulative average over batches of 8): what training leaves in them."""
    import torch
    from torch import nn

    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    module.train()
    with torch.no_grad():
        for start in range(0, len(images), 8):
            module(torch.from_numpy(images[start:start + 8]))
    module.eval()


def _fidelity_onnx(name: str, seed: int) -> tuple[pathlib.Path, float]:
    """The cached export of the untrained 224x224 model ``name`` (built now if missing)."""
    import torch

    from tests.models import _randomize_normalization, export_onnx

    cache = prepare_cache_dir()
    path = cache / f"{name}-seed{seed}-v{FIDELITY_BUILD_VERSION}-torch{torch.__version__}.onnx"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        return path, json.loads(meta.read_text())["build_s"]
    print(f"[{name}] building, estimating BatchNorm statistics, exporting ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    module = FIDELITY_BUILDERS[name]()
    _init_weights(module)
    # trained-looking BatchNorm affine params (tests/models.py), then running statistics
    # that match the activations, so folding BN into the convs is not a no-op
    _randomize_normalization(module)
    _estimate_batchnorm(module, smooth_images(FIDELITY_BN_SAMPLES, seed, stream=0))
    staging = path.with_suffix(".tmp.onnx")
    export_onnx(module.eval(), (torch.zeros(1, 3, 224, 224),), staging, opset=17)
    staging.replace(path)
    build_s = time.perf_counter() - start
    meta.write_text(json.dumps({"build_s": build_s, "seed": seed}))
    return path, build_s


def prepare_fidelity_case(name: str, *, seed: int, calib_samples: int, work: pathlib.Path) -> Case:
    source, build_s = _fidelity_onnx(name, seed)
    fp32 = work / f"{name}-fp32.onnx"
    shutil.copyfile(source, fp32)
    test_x = smooth_images(FIDELITY_EVAL_SAMPLES, seed, stream=2)
    start = time.perf_counter()
    ext_x = np.concatenate([test_x, smooth_images(FIDELITY_EXTRA_SAMPLES, seed, stream=3)])
    return Case(name=name, fp32_path=fp32, input_name="input",
                calib=smooth_images(min(calib_samples, FIDELITY_CALIB_SAMPLES), seed, stream=1),
                test_x=test_x, test_y=None, build_s=build_s, ext_x=ext_x, ext_s=time.perf_counter() - start)


# ---------------------------------------------------------------- cases


def prepare_case(name: str, *, seed: int, calib_samples: int, work: pathlib.Path) -> Case:
    """Float model, calibration samples and test split for architecture ``name``."""
    if name in FIDELITY_BUILDERS:
        return prepare_fidelity_case(name, seed=seed, calib_samples=calib_samples, work=work)
    x_train, x_test, y_train, y_test = digits_split()
    if name == "demo":
        from edgeopt.demo import demo_data, demo_model_path

        source, train_s = demo_model_path(), None
        x_test, y_test = demo_data()
    else:
        source, train_s = _trained_onnx(name, seed, x_train, y_train)
    fp32 = work / f"{name}-fp32.onnx"
    shutil.copyfile(source, fp32)
    pick = np.random.default_rng(seed).choice(len(x_train), size=min(calib_samples, len(x_train)), replace=False)
    calib = np.ascontiguousarray(_to_model_input(name, x_train[np.sort(pick)]), dtype=np.float32)
    test_x = np.ascontiguousarray(_to_model_input(name, x_test), dtype=np.float32)
    # shifted from the 8x8 test images themselves (the demo's bundled ones equal digits_split()'s);
    # the unshifted window comes first, so the larger set starts with test_x exactly
    start = time.perf_counter()
    shifted = all_shifts(x_test)[len(x_test):]
    ext_x = np.concatenate([test_x, np.ascontiguousarray(_to_model_input(name, shifted), dtype=np.float32)])
    return Case(name=name, fp32_path=fp32, input_name="input", calib=calib, test_x=test_x, test_y=y_test,
                train_s=train_s, ext_x=ext_x, ext_y=np.tile(y_test, len(SHIFT_WINDOWS)),
                ext_s=time.perf_counter() - start)


def ort_preprocess(case: Case, work: pathlib.Path) -> None:
    """ORT's recommended step before quantize_static (symbolic shapes, graph optimization)."""
    import onnxruntime as ort
    from onnxruntime.quantization.shape_inference import quant_pre_process

    ort.set_default_logger_severity(3)
    path = work / f"{case.name}-fp32-prep.onnx"
    start = time.perf_counter()
    try:
        quant_pre_process(str(case.fp32_path), str(path))
    except Exception as error:  # then ORT's pre-processed rows report the error
        print(f"[{case.name}] quant_pre_process failed: {error}", file=sys.stderr)
        return
    case.prep_path, case.prep_s = path, time.perf_counter() - start


# ---------------------------------------------------------------- measuring


def quantize_row(case: Case, setting: Setting, work: pathlib.Path, calib_path: pathlib.Path) -> Row:
    row = Row(setting=setting)
    source = case.prep_path if setting.preprocessed else case.fp32_path
    if source is None:
        row.error = "quant_pre_process failed"
        return row
    output = work / f"{case.name}-{setting.stem}.onnx"
    payload = {"tool": setting.tool, "method": setting.method, "model": str(source), "output": str(output),
               "calib": str(calib_path), "input": case.input_name}
    result = run_worker(SCRIPT, payload)
    if "error" in result:
        row.error = result["error"]
        return row
    row.path, row.wall_s = output, result["wall_s"]
    row.peak_rss_mb, row.baseline_rss_mb = result["peak_rss_mb"], result["baseline_rss_mb"]
    return row


def merge_repeats(first: Row, again: Row) -> Row:
    """Keep the smaller wall time and peak RSS of two runs of one setting (same output model)."""
    if first.error or again.error:
        return first if first.error else again
    first.wall_s = min(first.wall_s, again.wall_s)
    first.peak_rss_mb = min(first.peak_rss_mb, again.peak_rss_mb)
    first.baseline_rss_mb = min(first.baseline_rss_mb, again.baseline_rss_mb)
    return first


def _session(path: pathlib.Path):
    """An ONNX Runtime CPU session with the default graph optimizations."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def predict(session, images: np.ndarray, input_name: str) -> np.ndarray:
    """Logits of every image, batch 1."""
    return np.concatenate([session.run(None, {input_name: image[None]})[0].reshape(1, -1) for image in images])


def predict_batched(session, images: np.ndarray, input_name: str) -> np.ndarray:
    """Logits of every image, in batches of ``BATCH_INPUT_BYTES`` when the model's batch dimension is
    free; else, or when a batch fails or comes back with another batch size (a Reshape that hard-codes
    batch 1), one image at a time."""
    if isinstance(session.get_inputs()[0].shape[0], int) or not len(images):
        return predict(session, images, input_name)
    size = max(1, BATCH_INPUT_BYTES // images[0].nbytes)
    chunks = [images[start:start + size] for start in range(0, len(images), size)]
    try:
        outputs = [session.run(None, {input_name: chunk})[0] for chunk in chunks]
    except Exception:  # the model's graph does not follow its free batch dimension
        return predict(session, images, input_name)
    if any(len(output) != len(chunk) for output, chunk in zip(outputs, chunks)):
        return predict(session, images, input_name)
    return np.concatenate([output.reshape(len(output), -1) for output in outputs])


def _fidelity(logits: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement with the float model's logits, and output SQNR in dB."""
    agreement = float(np.mean(logits.argmax(1) == reference.argmax(1)))
    noise = float(np.sum((logits - reference) ** 2))
    sqnr_db = float("inf") if noise == 0 else float(10 * np.log10(float(np.sum(reference ** 2)) / noise))
    return agreement, sqnr_db


def evaluate(case: Case) -> None:
    """Accuracy (trained models), SQNR and top-1 agreement of every quantized model against the float one,
    on the test set and on the larger set (which starts with the test set: those logits are reused)."""
    session = _session(case.fp32_path)
    case.float_logits = predict(session, case.test_x, case.input_name)
    reference = case.float_logits
    if not case.fidelity_only:
        case.float_accuracy = float(np.mean(reference.argmax(1) == case.test_y))
    start = time.perf_counter()
    case.ext_float_logits = np.concatenate(
        [reference, predict_batched(session, case.ext_x[len(case.test_x):], case.input_name)])
    if not case.fidelity_only:
        case.ext_float_accuracy = float(np.mean(case.ext_float_logits.argmax(1) == case.ext_y))
    case.ext_s += time.perf_counter() - start
    for row in case.rows:
        if row.path is None:
            continue
        try:
            session = _session(row.path)
            logits = predict(session, case.test_x, case.input_name)
        except Exception as error:
            row.error, row.path = f"ORT cannot run it: {str(error).splitlines()[0][:200]}", None
            continue
        row.top1 = logits.argmax(1)
        if not case.fidelity_only:
            row.accuracy = float(np.mean(row.top1 == case.test_y))
        row.agreement, row.sqnr_db = _fidelity(logits, reference)
        start = time.perf_counter()
        evaluate_larger_set(case, row, session, logits)
        case.ext_s += time.perf_counter() - start


def evaluate_larger_set(case: Case, row: Row, session, test_logits: np.ndarray) -> None:
    """The row's accuracy (trained models), agreement and SQNR on ``case.ext_x``."""
    try:
        extra = predict_batched(session, case.ext_x[len(case.test_x):], case.input_name)
    except Exception as error:
        row.ext_error = f"ORT cannot run it: {str(error).splitlines()[0][:200]}"
        return
    logits = np.concatenate([test_logits, extra])
    row.ext_top1 = logits.argmax(1)
    if not case.fidelity_only:
        row.ext_accuracy = float(np.mean(row.ext_top1 == case.ext_y))
    row.ext_agreement, row.ext_sqnr_db = _fidelity(logits, case.ext_float_logits)


def time_latency(case: Case, runs: int) -> None:
    """Median latency of every quantized model, each timed interleaved with the float model, one thread.

    Pairs (fp32, int8) rather than all models at once: with more than a few
    worker processes taking turns on two cores every inference starts with
    cold caches. ``relative`` is the int8/fp32 ratio within the pair, so
    comparisons between quantized models are immune to drift of the machine.
    """
    from edgeopt.bench import BenchConfig, BenchTarget

    feeds = [{case.input_name: image[None]} for image in case.test_x[:TEST_FEEDS_FOR_LATENCY]]
    config = BenchConfig(runs=runs, warmup=max(10, runs // 10), threads=1)
    fp32 = BenchTarget(name=case.fp32_path.name, onnx_bytes=case.fp32_path.read_bytes(),
                       file_bytes=case.fp32_path.stat().st_size)
    float_ms = []
    with _pinned_to_one_core():
        _time_pairs(case, fp32, feeds, config, float_ms)
    case.float_latency_ms = float(np.median(float_ms)) if float_ms else None


@contextlib.contextmanager
def _pinned_to_one_core():
    """Run the bench workers (they inherit the affinity) on one core, so both models of a pair
    share that core's caches and whatever else the machine runs there."""
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {max(previous)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


def _time_pairs(case: Case, fp32, feeds: list, config, float_ms: list[float]) -> None:
    from edgeopt.bench import BenchTarget, bench_models

    for row in case.rows:
        if row.path is None:
            continue
        int8 = BenchTarget(name=row.path.name, onnx_bytes=row.path.read_bytes(), file_bytes=row.path.stat().st_size)
        result = bench_models([fp32, int8], [feeds, feeds], config)
        float_ms.append(result.models[0].median_ms)
        row.latency_ms, row.relative = result.models[1].median_ms, result.ratios()[1]


def edgeopt_default_method() -> str:
    from edgeopt.quant import Int8Config

    return Int8Config().calibration.value


def run_case(name: str, args: argparse.Namespace, work: pathlib.Path) -> Case:
    case = prepare_case(name, seed=args.seed, calib_samples=args.calib_samples, work=work)
    calib_path = work / f"{name}-calib.npy"
    np.save(calib_path, case.calib)
    ort_preprocess(case, work)
    for repeat in range(args.repeats):
        rows = []
        for setting in settings(args, name):
            print(f"[{name}] {setting.tool} {setting.label} (run {repeat + 1}/{args.repeats}) ...",
                  file=sys.stderr, flush=True)
            rows.append(quantize_row(case, setting, work, calib_path))
        case.rows = rows if not case.rows else [merge_repeats(a, b) for a, b in zip(case.rows, rows)]
    evaluate(case)
    print(f"[{name}] timing {len(case.rows) + 1} models ...", file=sys.stderr, flush=True)
    time_latency(case, runs_for(name, args))
    return case


def runs_for(name: str, args: argparse.Namespace) -> int:
    return min(args.runs, FIDELITY_RUNS) if name in FIDELITY_MODELS else args.runs


def settings(args: argparse.Namespace, name: str) -> list[Setting]:
    if name in FIDELITY_MODELS:  # a limited set: each quantization of a 224x224 model takes seconds
        edgeopt = [m for m in args.edgeopt_methods if m in FIDELITY_EDGEOPT_METHODS]
        ort = [m for m in args.ort_methods if m in FIDELITY_ORT_METHODS]
        return [Setting("edgeopt", m) for m in edgeopt] + [Setting("ort", m, True) for m in ort]
    result = [Setting("edgeopt", m) for m in args.edgeopt_methods]
    for preprocessed in (False, True):
        result += [Setting("ort", m, preprocessed) for m in args.ort_methods]
    return result


# ---------------------------------------------------------------- targets


def _evaluated(rows: list[Row], *, larger: bool = False) -> list[Row]:
    return [r for r in rows if (r.ext_agreement if larger else r.agreement) is not None]


def _score(case: Case, row: Row, *, larger: bool = False) -> tuple:
    """Sort key, best last: accuracy (trained models) or top-1 agreement with the float model
    (untrained 224x224 models); ties: higher SQNR, then lower latency. ``larger``: on the larger set."""
    if larger:
        first = row.ext_agreement if case.fidelity_only else row.ext_accuracy
        return first, row.ext_sqnr_db, -(row.relative or float("inf"))
    first = row.agreement if case.fidelity_only else row.accuracy
    return first, row.sqnr_db, -(row.relative or float("inf"))


def _best(case: Case, rows: list[Row], *, larger: bool = False) -> Row | None:
    """Most accurate (or most faithful) row, on the test set or on the larger set."""
    ok = _evaluated(rows, larger=larger)
    return max(ok, key=lambda r: _score(case, r, larger=larger)) if ok else None


def _drop(case: Case, row: Row, *, larger: bool = False) -> float:
    if larger:
        return 100.0 * (case.ext_float_accuracy - row.ext_accuracy)
    return 100.0 * (case.float_accuracy - row.accuracy)


def _counterpart(row: Row, ort_rows: list[Row], ort_best: Row) -> Row:
    """ORT's run with the same calibration algorithm on the same (not pre-processed) model; where
    only pre-processed runs exist (224x224 models), the pre-processed one; else ORT's best."""
    same = SAME_METHOD.get(row.setting.method)
    candidates = [c for c in ort_rows if c.setting.method == same and c.wall_s is not None]
    return min(candidates, key=lambda c: c.setting.preprocessed) if candidates else ort_best


def _recommended_counterpart(row: Row, ort_rows: list[Row]) -> Row | None:
    """ORT's recommended flow (quant_pre_process first) with the same method, else MinMax."""
    method = SAME_METHOD.get(row.setting.method, "MinMax")
    for candidate in ort_rows:
        if candidate.setting.method == method and candidate.setting.preprocessed and candidate.relative:
            return candidate
    return None


@dataclass
class Check:
    target: str
    model: str
    edgeopt: str
    ort: str
    measured: str
    passed: bool | None  # None: could not be evaluated, or shown for information only
    informational: bool = False
    paired: str = "-"  # accuracy checks: the inputs on which the two tools differ, and McNemar's p


def mcnemar_p(only_first: int, only_second: int) -> float:
    """Exact two-sided McNemar test: the probability, if both models were equally good, of a split of
    the discordant inputs at least this uneven (binomial with p = 1/2 over ``only_first + only_second``)."""
    count = only_first + only_second
    if count == 0:
        return 1.0
    tail = sum(math.comb(count, k) for k in range(min(only_first, only_second) + 1))
    return min(1.0, 2 * tail / 2 ** count)


def _paired(case: Case, row: Row, other: Row, *, larger: bool = False) -> str:
    """Inputs that only edgeopt's row, and only ORT's, gets right (trained models: the label; untrained:
    the float model's top-1), with McNemar's p for the difference."""
    mine, theirs = (row.ext_top1, other.ext_top1) if larger else (row.top1, other.top1)
    if mine is None or theirs is None:
        return "-"
    if case.fidelity_only:
        truth = (case.ext_float_logits if larger else case.float_logits).argmax(1)
    else:
        truth = case.ext_y if larger else case.test_y
    right, right_other = mine == truth, theirs == truth
    only_mine, only_theirs = int(np.sum(right & ~right_other)), int(np.sum(right_other & ~right))
    return f"{only_mine} / {only_theirs}, p = {mcnemar_p(only_mine, only_theirs):.2f}"


def _verdict(check: Check) -> str:
    if check.informational:
        return "info"
    return {True: "PASS", False: "FAIL", None: "n/a"}[check.passed]


def _accuracy_checks(case: Case, who: str, row: Row, ort_rows: list[Row], ort_best: Row) -> list[Check]:
    if case.fidelity_only:
        # untrained: no labels, so the accuracy target is read as fidelity to the float model
        agree, best_agree = 100 * row.agreement, 100 * ort_best.agreement
        top_sqnr = max(_evaluated(ort_rows), key=lambda r: r.sqnr_db)
        return [Check("top-1 agreement >= ORT's best (untrained)", case.name, f"{who} {agree:.1f} %",
                      f"{ort_best.setting.label} {best_agree:.1f} %", f"{agree - best_agree:+.1f} pts",
                      agree >= best_agree - 1e-9, paired=_paired(case, row, ort_best)),
                # compared at the precision shown (0.1 dB): smaller differences are not meaningful
                Check("output SQNR >= ORT's best (untrained)", case.name, f"{who} {row.sqnr_db:.1f} dB",
                      f"{top_sqnr.setting.label} {top_sqnr.sqnr_db:.1f} dB",
                      f"{row.sqnr_db - top_sqnr.sqnr_db:+.1f} dB",
                      round(row.sqnr_db, 1) >= round(top_sqnr.sqnr_db, 1))]
    drop, best_drop = _drop(case, row), _drop(case, ort_best)
    checks = [Check("accuracy drop <= ORT's best", case.name, f"{who} {drop:+.2f} pts",
                    f"{ort_best.setting.label} {best_drop:+.2f} pts", f"{drop - best_drop:+.2f} pts",
                    drop <= best_drop + 1e-9, paired=_paired(case, row, ort_best))]
    if case.name == "demo":
        checks.append(Check("demo accuracy drop <= 0.5 pts", case.name, f"{who} {drop:+.2f} pts", "-",
                            f"{drop:+.2f} pts", drop <= 0.5))
    return checks


def _larger_set_checks(case: Case, who: str, row: Row, ort_rows: list[Row]) -> list[Check]:
    """The accuracy targets again on the larger set, against ORT's best setting on that set."""
    ort_best = _best(case, ort_rows, larger=True)
    kind = "held-out inputs" if case.fidelity_only else "shifted test images"
    where = f"({len(case.ext_x):,} {kind})"
    if ort_best is None or row.ext_agreement is None:
        return [Check(f"accuracy {where}", case.name, f"{who} {row.ext_error or '-'}",
                      "no ORT result" if ort_best is None else "-", "-", None)]
    if case.fidelity_only:
        agree, best_agree = 100 * row.ext_agreement, 100 * ort_best.ext_agreement
        top_sqnr = max(_evaluated(ort_rows, larger=True), key=lambda r: r.ext_sqnr_db)
        return [Check(f"top-1 agreement >= ORT's best {where}", case.name, f"{who} {agree:.1f} %",
                      f"{ort_best.setting.label} {best_agree:.1f} %", f"{agree - best_agree:+.1f} pts",
                      agree >= best_agree - 1e-9, paired=_paired(case, row, ort_best, larger=True)),
                # compared at the precision shown (0.1 dB), as on the small set
                Check(f"output SQNR >= ORT's best {where}", case.name, f"{who} {row.ext_sqnr_db:.1f} dB",
                      f"{top_sqnr.setting.label} {top_sqnr.ext_sqnr_db:.1f} dB",
                      f"{row.ext_sqnr_db - top_sqnr.ext_sqnr_db:+.1f} dB",
                      round(row.ext_sqnr_db, 1) >= round(top_sqnr.ext_sqnr_db, 1))]
    drop, best_drop = _drop(case, row, larger=True), _drop(case, ort_best, larger=True)
    return [Check(f"accuracy drop <= ORT's best {where}", case.name, f"{who} {drop:+.2f} pts",
                  f"{ort_best.setting.label} {best_drop:+.2f} pts", f"{drop - best_drop:+.2f} pts",
                  drop <= best_drop + 1e-9, paired=_paired(case, row, ort_best, larger=True))]


def check_targets(case: Case, which: str, row: Row, ort_rows: list[Row], ort_best: Row, *,
                  larger_row: Row | None = None) -> list[Check]:
    """The issue's targets for one edgeopt setting on one model; the larger-set accuracy targets for
    ``larger_row`` (the same setting, or for "best" the one most accurate on the larger set)."""
    who = f"{which}: {row.setting.label}"
    checks = _accuracy_checks(case, who, row, ort_rows, ort_best)
    if larger_row is not None:
        checks += _larger_set_checks(case, f"{which}: {larger_row.setting.label}", larger_row, ort_rows)
    other = _counterpart(row, ort_rows, ort_best)
    time_ratio = row.wall_s / other.wall_s
    checks.append(Check("calibration wall <= 0.5x ORT", case.name, f"{who} {row.wall_s:.2f} s",
                        f"{other.setting.label} {other.wall_s:.2f} s", f"{time_ratio:.2f}x", time_ratio <= 0.5))
    checks.append(Check("peak RSS <= ORT", case.name, f"{who} {row.peak_rss_mb:.0f} MB",
                        f"{other.setting.label} {other.peak_rss_mb:.0f} MB",
                        f"{row.peak_rss_mb - other.peak_rss_mb:+.0f} MB", row.peak_rss_mb <= other.peak_rss_mb))
    recommended = _recommended_counterpart(row, ort_rows)
    if row.relative is None or recommended is None:
        return checks
    ratio = row.relative / recommended.relative
    checks.append(Check("int8 latency <= 1.05x ORT's", case.name,
                        f"{who} {row.latency_ms:.3f} ms ({1 / row.relative:.2f}x fp32)",
                        f"{recommended.setting.label} {recommended.latency_ms:.3f} ms "
                        f"({1 / recommended.relative:.2f}x fp32)", f"{ratio:.2f}x", ratio <= 1.05))
    speedup = 1 / row.relative
    if case.name in LATENCY_TARGET_MODELS:
        checks.append(Check("int8 >= 1.5x faster than fp32 (224x224 conv)", case.name, f"{who} {speedup:.2f}x",
                            f"{recommended.setting.label} {1 / recommended.relative:.2f}x",
                            f"{speedup:.2f}x", speedup >= 1.5))
    elif case.name in CONV_MODELS:
        checks.append(Check("int8 vs fp32, 32x32 conv (not judged)", case.name, f"{who} {speedup:.2f}x",
                            f"{recommended.setting.label} {1 / recommended.relative:.2f}x",
                            f"{speedup:.2f}x", None, informational=True))
    return checks


def all_checks(cases: list[Case], default_method: str) -> list[Check]:
    checks = []
    for case in cases:
        ort_rows = _evaluated([r for r in case.rows if r.setting.tool == "ort"])
        edgeopt_rows = _evaluated([r for r in case.rows if r.setting.tool == "edgeopt"])
        ort_best = _best(case, ort_rows)
        if ort_best is None or not edgeopt_rows:
            checks.append(Check("all", case.name, "no edgeopt result" if not edgeopt_rows else "-",
                                "no ORT result" if ort_best is None else "-", "-", None))
            continue
        default = next((r for r in edgeopt_rows if r.setting.method == default_method), None)
        # "best" is the most accurate setting on each set: the two may differ
        best, larger_best = _best(case, edgeopt_rows), _best(case, edgeopt_rows, larger=True)
        if default is not None:
            checks += check_targets(case, "default", default, ort_rows, ort_best, larger_row=default)
        larger_best = None if larger_best is default else larger_best
        if best is not default:
            checks += check_targets(case, "best", best, ort_rows, ort_best, larger_row=larger_best)
        elif larger_best is not None:
            checks += _larger_set_checks(case, f"best: {larger_best.setting.label}", larger_best, ort_rows)
    return checks


# ---------------------------------------------------------------- report


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def results_table(cases: list[Case]) -> list[str]:
    headers = ["model", "tool", "setting", "top-1 %", "drop pts", "SQNR dB", "agree %", "calib s",
               "peak RSS MB", "median ms", "vs fp32"]
    rows = []
    for case in cases:
        float_top1 = "-" if case.fidelity_only else f"{100 * case.float_accuracy:.2f}"
        rows.append([case.name, "float", "fp32", float_top1, "-", "-", "-", "-", "-",
                     _fmt(case.float_latency_ms, ".3f"), "1.00x"])
        for row in case.rows:
            s = row.setting
            if row.error:
                rows.append([case.name, s.tool, s.label, row.error, *["-"] * 7])
                continue
            speedup = 1 / row.relative if row.relative else None
            top1, drop = ("-", "-") if case.fidelity_only else (f"{100 * row.accuracy:.2f}",
                                                                  f"{_drop(case, row):+.2f}")
            rows.append([case.name, s.tool, s.label, top1, drop, _fmt(row.sqnr_db, ".1f"),
                         f"{100 * row.agreement:.1f}", f"{row.wall_s:.2f}",
                         f"{row.peak_rss_mb:.0f}", _fmt(row.latency_ms, ".3f"),
                         "-" if speedup is None else f"{speedup:.2f}x"])
    return markdown_table(headers, rows, right=[False] * 3 + [True] * 8)


def larger_results_table(cases: list[Case]) -> list[str]:
    headers = ["model", "tool", "setting", "shifted top-1 %", "drop pts", "SQNR dB", "agree %"]
    rows = []
    for case in cases:
        float_top1 = "-" if case.fidelity_only else f"{100 * case.ext_float_accuracy:.2f}"
        rows.append([case.name, "float", "fp32", float_top1, "-", "-", "-"])
        for row in case.rows:
            s = row.setting
            if row.error or row.ext_error:
                rows.append([case.name, s.tool, s.label, row.error or row.ext_error, *["-"] * 3])
                continue
            top1, drop = ("-", "-") if case.fidelity_only else (f"{100 * row.ext_accuracy:.2f}",
                                                                  f"{_drop(case, row, larger=True):+.2f}")
            rows.append([case.name, s.tool, s.label, top1, drop, f"{row.ext_sqnr_db:.1f}",
                         f"{100 * row.ext_agreement:.1f}"])
    return markdown_table(headers, rows, right=[False] * 3 + [True] * 4)


def notes(cases: list[Case]) -> list[str]:
    lines = []
    for case in cases:
        parts = []
        if case.train_s is not None:
            parts.append(f"trained {TRAIN_EPOCHS[case.name]} epochs in {case.train_s:.0f} s")
        if case.fidelity_only:
            classes = len(set(case.float_logits.argmax(1).tolist())) if case.float_logits is not None else 0
            parts.append(f"untrained, built and exported in {case.build_s:.0f} s; {len(case.calib)} calibration "
                         f"and {len(case.test_x)} held-out inputs; the float model's top-1 over the held-out "
                         f"inputs spans {classes} distinct classes (one input = {100 / len(case.test_x):.1f} pts "
                         "of agreement)")
        if case.ext_x is not None:
            parts.append(f"larger set of {len(case.ext_x):,} inputs built and run through every model in "
                         f"{case.ext_s:.0f} s")
        if case.prep_s is not None:
            parts.append(f"ORT quant_pre_process {case.prep_s:.2f} s (not included in calib s)")
        baselines = [r.baseline_rss_mb for r in case.rows if r.baseline_rss_mb is not None]
        if baselines:
            parts.append(f"worker RSS before quantizing {min(baselines):.0f}-{max(baselines):.0f} MB")
        lines.append(f"- {case.name}: " + "; ".join(parts) if parts else f"- {case.name}")
    return lines


def report(cases: list[Case], checks: list[Check], env: dict, args: argparse.Namespace,
           default_method: str) -> str:
    ext_inputs = FIDELITY_EVAL_SAMPLES + FIDELITY_EXTRA_SAMPLES
    lines = ["## quantize_vs_ort: edgeopt vs onnxruntime.quantization.quantize_static", "",
             *environment_markdown(env),
             f"- seed {args.seed}; 32x32 models: {args.calib_samples} calibration samples (digits training split, "
             f"batch 1), the same for both tools; test split 450 images; latency: {args.runs} runs, each int8 "
             "model interleaved with fp32 on one pinned core, 1 intra-op thread, median",
             f"- 224x224 models ({', '.join(FIDELITY_MODELS)}; untrained, seeded, BatchNorm statistics estimated "
             f"on smooth image-like inputs): {min(args.calib_samples, FIDELITY_CALIB_SAMPLES)} calibration inputs, "
             f"{FIDELITY_EVAL_SAMPLES} separate held-out inputs for fidelity (no labels: top-1 % and drop are "
             f"'-'); latency {min(args.runs, FIDELITY_RUNS)} runs; settings limited to edgeopt "
             f"{' + '.join(FIDELITY_EDGEOPT_METHODS)} and ORT {' + '.join(FIDELITY_ORT_METHODS)} after "
             "quant_pre_process",
             f"- edgeopt default calibration: {default_method}; every edgeopt row is "
             "`Int8Config(calibration=M)` with the other defaults (bias correction on, equalization and "
             f"AdaRound off); each setting quantized {args.repeats}x, least time and RSS kept",
             f"- load average (1 min) at start {args.load_start:.2f}, at end {os.getloadavg()[0]:.2f} "
             f"on {os.cpu_count()} cores (other work on the machine inflates and blurs times)",
             f"- one test image is 0.22 points, one of the {FIDELITY_EVAL_SAMPLES} held-out inputs "
             f"{100 / FIDELITY_EVAL_SAMPLES:.1f} points of agreement: too coarse to separate close settings, "
             "hence the larger sets below; ORT's `Distribution` method is meant for float8 (ORT docs), listed "
             "for completeness",
             f"- larger evaluation sets: the 450 test images each in its {len(SHIFT_WINDOWS)} one-pixel shifts "
             f"(pad by one zero pixel, all nine 8x8 windows; {450 * len(SHIFT_WINDOWS):,} labelled images, one = "
             f"{100 / (450 * len(SHIFT_WINDOWS)):.3f} points) for the trained models; {ext_inputs} held-out "
             f"inputs for the 224x224 models (the {FIDELITY_EVAL_SAMPLES} above plus {FIDELITY_EXTRA_SAMPLES} "
             f"more, one = {100 / ext_inputs:.2f} points of agreement)",
             "", "### Results", "", *results_table(cases), "", *notes(cases), "",
             "### Results on the larger evaluation sets", "",
             "Shifted top-1 and drop: trained models on the shifted test images; SQNR and agreement with the float "
             "model on the same set (224x224 models: on the held-out inputs).", "",
             *larger_results_table(cases), "", "### Targets", "",
             "- accuracy: on the trained 32x32 models, test-accuracy drop against ORT's most accurate setting; on "
             "the untrained 224x224 models, top-1 agreement with the float model against ORT's most faithful "
             "setting (most agreement, ties by SQNR) and output SQNR against ORT's highest; each judged again on "
             "the larger set, with ORT's best (and edgeopt's 'best') chosen on that set, by the same rule",
             "- calibration time and peak RSS: against ORT with the same calibration algorithm on the same "
             "exported model (224x224 models: on ORT's pre-processed model, the only ORT runs there)",
             "- int8 >= 1.5x faster than fp32: judged on the 224x224 convolutional models only "
             f"({', '.join(m for m in FIDELITY_MODELS if m in LATENCY_TARGET_MODELS)}); the 32x32 models run "
             "in ~0.1 ms in fp32, where per-op overhead dominates, so their ratios are shown as 'info' and not "
             "counted",
             "- right only by edgeopt / ORT (accuracy checks): the inputs each tool alone classifies correctly "
             "(untrained models: alone agrees with the float model), and the exact two-sided McNemar p of that "
             "split; shown for information, the verdict is the check's own. A small p (< 0.05) means the "
             "difference is unlikely to be chance; ORT's best is picked among its settings on the very set it "
             "is judged on, which favours it when settings differ by chance", ""]
    if checks:
        lines += markdown_table(["target", "model", "edgeopt", "ORT", "measured", "right only by edgeopt / ORT",
                                 "result"],
                                [[c.target, c.model, c.edgeopt, c.ort, c.measured, c.paired, _verdict(c)]
                                 for c in checks])
        evaluated = [c for c in checks if c.passed is not None and not c.informational]
        failed = [c for c in evaluated if not c.passed]
        lines += ["", f"{len(evaluated) - len(failed)} of {len(evaluated)} checks pass."]
    else:
        lines.append("No targets evaluated (no edgeopt results).")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ALL_MODELS), help=f"comma-separated, from {', '.join(ALL_MODELS)}")
    parser.add_argument("--calib-samples", type=int, default=200)
    parser.add_argument("--runs", type=int, default=500,
                        help=f"timed inferences per model and pair (at most {FIDELITY_RUNS} on the 224x224 models)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2,
                        help="quantize each setting this many times, interleaved; keep the least time and RSS")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: demo + mobilenet_v2, minmax only, 100 samples, 50 runs")
    parser.add_argument("--markdown", type=pathlib.Path, help="also write the report here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(ALL_MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(ALL_MODELS)}")
    args.edgeopt_methods, args.ort_methods = list(EDGEOPT_METHODS), list(ORT_METHODS)
    if args.quick:
        args.models = [m for m in args.models if m in ("demo", "mobilenet_v2")] or ["demo"]
        args.edgeopt_methods, args.ort_methods = ["minmax"], ["MinMax"]
        args.calib_samples, args.runs = min(args.calib_samples, 100), min(args.runs, 50)
        args.repeats = 1
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    env = environment([str(pathlib.Path(sys.argv[0])), *argv])
    args.load_start = os.getloadavg()[0]
    default_method = edgeopt_default_method()
    work = prepare_cache_dir() / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    start = time.perf_counter()
    cases = [run_case(name, args, work) for name in args.models]
    text = report(cases, all_checks(cases, default_method), env, args, default_method)
    text += f"\nTotal benchmark time {time.perf_counter() - start:.0f} s.\n"
    publish(text, args.markdown)
    return 0


if __name__ == "__main__":
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main(sys.argv[1:]))
