"""Batches decoded from a folder of images, with a declared preprocessing.

For each image (png, jpg, jpeg, bmp, webp; the folder is searched
recursively, hidden files and folders skipped, paths sorted naturally):

1. decode with Pillow and convert to ``L`` (1 channel) or ``RGB`` (3), as the
   model input wants (8-bit images: a 16-bit or float one is refused, as
   Pillow's conversion clips it at 255);
2. resize to ``size = (H, W)`` with bilinear filtering (default: the input's
   static height and width; a dynamic one keeps each image's own, so a model
   with dynamic image dims calibrates on the images as they are);
3. by dtype: ``float32`` → ``x = (pixel / 255 - mean[c]) / std[c]``;
   ``uint8`` → raw pixels; ``int8`` → ``pixel - 128`` (TFLite int8 inputs);
4. lay out as NCHW or NHWC and stack ``B`` images per batch, ``B`` being the
   input's static batch dim (1 when dynamic; a last incomplete batch is dropped).

``layout=auto`` reads the input shape: 1 or 3 at position 1 means NCHW, at
position -1 NHWC. ``dtype=auto`` follows the input: uint8 and int8 inputs get
raw pixels, anything else float32 (cast by ``check_feed`` if needed).
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from edgeopt._scalars import is_integer, is_number, plain_fields
from edgeopt.data.base import DataSource
from edgeopt.data.feeds import shape_text
from edgeopt.data.npy import check_path, natural_key
from edgeopt.errors import ConfigError, DataError
from edgeopt.ir.values import InputSpec

__all__ = ["IMAGE_SUFFIXES", "ImageDtype", "ImageFolderSource", "ImagePreprocess", "Layout", "list_images"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class Layout(enum.Enum):
    """Where the channel axis of an image tensor is."""

    AUTO = "auto"
    NCHW = "nchw"
    NHWC = "nhwc"


class ImageDtype(enum.Enum):
    """What the pixel values become: normalized floats, raw uint8, or uint8 - 128."""

    AUTO = "auto"
    FLOAT32 = "float32"
    UINT8 = "uint8"
    INT8 = "int8"


def _check_floats(key: str, values: tuple[float, ...], *, positive: bool) -> None:
    if not isinstance(values, tuple) or not values:
        raise ConfigError(f"{key} must be a non-empty tuple of numbers, one per channel or one for all")
    if not all(is_number(v) and math.isfinite(v) and (v > 0 or not positive) for v in values):
        kind = "positive numbers" if positive else "finite numbers"
        raise ConfigError(f"{key}={values} must hold {kind}")


@dataclass(frozen=True, kw_only=True)
class ImagePreprocess:
    """How images become input tensors; every field defaults to what the model input says."""

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: Layout = Layout.AUTO
    dtype: ImageDtype = ImageDtype.AUTO

    def __post_init__(self) -> None:
        plain_fields(self)
        if self.size is not None and not (isinstance(self.size, tuple) and len(self.size) == 2
                                          and all(is_integer(d) and d > 0 for d in self.size)):
            raise ConfigError(f"size={self.size!r} must be (height, width) in positive pixels, e.g. (224, 224)")
        _check_floats("mean", self.mean, positive=False)
        _check_floats("std", self.std, positive=True)
        if not isinstance(self.layout, Layout):
            choices = ", ".join(m.value for m in Layout)
            raise ConfigError(f"layout={self.layout!r} must be a Layout: {choices}")
        if not isinstance(self.dtype, ImageDtype):
            choices = ", ".join(m.value for m in ImageDtype)
            raise ConfigError(f"dtype={self.dtype!r} must be an ImageDtype: {choices}")
        normalizes = self.mean != (0.0,) or self.std != (1.0,)
        if normalizes and self.dtype in (ImageDtype.UINT8, ImageDtype.INT8):
            raise ConfigError(f"mean/std apply to float32 images only; dtype={self.dtype.value} keeps raw pixels")

    @classmethod
    def parse(cls, text: str) -> ImagePreprocess:
        """Parse ``size=224x224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=nchw,dtype=float32``."""
        fields: dict[str, object] = {}
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            key, sep, value = (s.strip() for s in item.partition("="))
            if not sep or key.lower() not in _PARSERS:
                raise ConfigError(f"preprocess option {item!r} is not KEY=VALUE with a known key; "
                                  f"allowed keys: {', '.join(_PARSERS)}")
            if key.lower() in fields:
                raise ConfigError(f"preprocess option {key!r} is given twice")
            fields[key.lower()] = _PARSERS[key.lower()](value)
        return cls(**fields)

    def text(self) -> str:
        """The compact form :meth:`parse` reads back."""
        parts = [f"size={self.size[0]}x{self.size[1]}"] if self.size else []
        parts += [f"mean={'/'.join(map(str, self.mean))}", f"std={'/'.join(map(str, self.std))}",
                  f"layout={self.layout.value}", f"dtype={self.dtype.value}"]
        return ",".join(parts)


def _parse_size(value: str) -> tuple[int, int]:
    try:
        dims = tuple(int(d) for d in value.lower().split("x"))
    except ValueError:
        raise ConfigError(f"size={value!r} must be HxW in pixels, like 224x224") from None
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2:
        raise ConfigError(f"size={value!r} must be HxW in pixels, like 224x224")
    return dims  # type: ignore[return-value]


def _parse_floats(key: str) -> Callable[[str], tuple[float, ...]]:
    def parse(value: str) -> tuple[float, ...]:
        try:
            return tuple(float(v) for v in value.split("/"))
        except ValueError:
            raise ConfigError(f"{key}={value!r} must be numbers separated by '/', "
                              "like 0.485/0.456/0.406") from None
    return parse


def _parse_enum(key: str, kind: type[enum.Enum]) -> Callable[[str], enum.Enum]:
    def parse(value: str) -> enum.Enum:
        try:
            return kind(value.lower())
        except ValueError:
            raise ConfigError(f"{key}={value!r}: choose one of {', '.join(m.value for m in kind)}") from None
    return parse


_PARSERS: dict[str, Callable[[str], object]] = {
    "size": _parse_size,
    "mean": _parse_floats("mean"),
    "std": _parse_floats("std"),
    "layout": _parse_enum("layout", Layout),
    "dtype": _parse_enum("dtype", ImageDtype),
}


@dataclass(frozen=True, kw_only=True)
class _Plan:
    """The resolved geometry and values of the tensors one image becomes."""

    layout: Layout
    channels: int
    height: int | None  # None: each image's own (a dynamic dim and no size= given)
    width: int | None
    batch: int
    dtype: ImageDtype
    mean: np.ndarray = field(repr=False)
    std: np.ndarray = field(repr=False)


def _resolve_layout(spec: InputSpec, layout: Layout) -> Layout:
    if layout is not Layout.AUTO:
        return layout
    if spec.shape[1] in (1, 3):
        return Layout.NCHW
    if spec.shape[3] in (1, 3):
        return Layout.NHWC
    raise ConfigError(f"cannot tell the layout of input {spec.name!r} ({shape_text(spec.shape)}): "
                      "pass layout=nchw or layout=nhwc")


def _resolve_size(spec: InputSpec, layout: Layout,
                  size: tuple[int, int] | None) -> tuple[int | None, int | None]:
    model_size = spec.shape[2:4] if layout is Layout.NCHW else spec.shape[1:3]
    if size is None:  # a dynamic dim keeps each image's own size (None)
        return tuple(d if isinstance(d, int) else None for d in model_size)
    if any(isinstance(want, int) and want != got for want, got in zip(model_size, size)):
        raise ConfigError(f"size={size[0]}x{size[1]} but input {spec.name!r} wants "
                          f"{shape_text(model_size)} images: drop size= or match it")
    return size


def _resolve_dtype(spec: InputSpec, dtype: ImageDtype) -> ImageDtype:
    if dtype is not ImageDtype.AUTO:
        return dtype
    raw = {np.dtype(np.uint8): ImageDtype.UINT8, np.dtype(np.int8): ImageDtype.INT8}
    return raw.get(spec.dtype, ImageDtype.FLOAT32)


def _per_channel(key: str, values: tuple[float, ...], channels: int) -> np.ndarray:
    if len(values) not in (1, channels):
        raise ConfigError(f"{key} has {len(values)} values but the model input has {channels} channels: "
                          f"give 1 or {channels}")
    return np.broadcast_to(np.asarray(values, dtype=np.float32), (channels,))


def _plan(spec: InputSpec, preprocess: ImagePreprocess) -> _Plan:
    if len(spec.shape) != 4:
        raise DataError(f"image data feeds 4-D inputs (NCHW or NHWC), but input {spec.name!r} has shape "
                        f"{shape_text(spec.shape)}: use .npy data for this model")
    layout = _resolve_layout(spec, preprocess.layout)
    channel_dim = spec.shape[1] if layout is Layout.NCHW else spec.shape[3]
    channels = channel_dim if isinstance(channel_dim, int) else 3
    if channels not in (1, 3):
        raise DataError(f"input {spec.name!r} wants {channels} channels; images give 1 (grayscale) or 3 (RGB)")
    height, width = _resolve_size(spec, layout, preprocess.size)
    batch = spec.shape[0] if isinstance(spec.shape[0], int) else 1
    return _Plan(layout=layout, channels=channels, height=height, width=width, batch=batch,
                 dtype=_resolve_dtype(spec, preprocess.dtype),
                 mean=_per_channel("mean", preprocess.mean, channels),
                 std=_per_channel("std", preprocess.std, channels))


_WIDE_MODES = ("I", "F")  # 32-bit integer and float pixels; 16-bit ones are I;16, I;16B ...


def _decode(path: Path, plan: _Plan) -> np.ndarray:
    """The image as ``H x W x C`` uint8 pixels at the planned size."""
    try:
        with Image.open(path) as image:
            if image.mode in _WIDE_MODES or image.mode.startswith("I;16"):  # Pillow's convert clips them at 255
                raise DataError(f"image {path} has {image.mode} pixels (more than 8 bits): the image "
                                "preprocessing reads 8-bit images; scale and save the samples as .npy instead")
            converted = image.convert("L" if plan.channels == 1 else "RGB")
            target = (plan.width or converted.size[0], plan.height or converted.size[1])
            if converted.size != target:
                converted = converted.resize(target, Image.Resampling.BILINEAR)
            pixels = np.asarray(converted, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"cannot decode image {path} ({first_line}): remove or replace the file") from None
    return pixels.reshape(pixels.shape[0], pixels.shape[1], plan.channels)


def _to_tensor(pixels: np.ndarray, plan: _Plan) -> np.ndarray:
    if plan.dtype is ImageDtype.UINT8:
        data = pixels
    elif plan.dtype is ImageDtype.INT8:
        data = (pixels.astype(np.int16) - 128).astype(np.int8)
    else:
        data = (pixels.astype(np.float32) / np.float32(255.0) - plan.mean) / plan.std
    return data.transpose(2, 0, 1) if plan.layout is Layout.NCHW else data


def list_images(folder: Path) -> list[Path]:
    """Visible image files under ``folder`` (recursively), sorted naturally by relative path."""
    found = [p for p in folder.rglob("*")
             if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(found, key=lambda p: natural_key(p.relative_to(folder).as_posix()))


class ImageFolderSource(DataSource):
    """Batches decoded from the images of a folder, for a single-input image model."""

    def __init__(self, path: str | Path, specs: Sequence[InputSpec],
                 preprocess: ImagePreprocess | None = None) -> None:
        super().__init__(specs)
        self._path = Path(path)
        check_path(self._path)
        if not self._path.is_dir():
            raise DataError(f"image data {self._path} is not a folder: put the images in a folder")
        if len(self._specs) != 1:
            names = ", ".join(spec.name for spec in self._specs)
            raise DataError(f"image folders feed single-input models; this model has inputs {names}: "
                            "use .npz files or a module:function source")
        self._preprocess = preprocess or ImagePreprocess()
        self._plan = _plan(self._specs[0], self._preprocess)
        self._images = list_images(self._path)
        if not self._images:
            raise DataError(f"image folder {self._path} holds no images ({', '.join(IMAGE_SUFFIXES)})")

    @property
    def num_samples(self) -> int:
        return len(self._images) // self._plan.batch

    def _feeds(self) -> Iterator[tuple[Mapping[str, object], str]]:
        name, batch = self._specs[0].name, self._plan.batch
        if len(self._images) % batch:
            logger.warning("%s: dropping the last %d images, short of a batch of %d",
                           self._path, len(self._images) % batch, batch)
        for start in range(0, self.num_samples * batch, batch):
            paths = self._images[start:start + batch]
            tensors = [_to_tensor(_decode(path, self._plan), self._plan) for path in paths]
            if len({tensor.shape for tensor in tensors}) > 1:
                sizes = ", ".join(f"{path.name} {tensor.shape}" for path, tensor in zip(paths, tensors))
                raise DataError(f"images of one batch of {batch} differ in size ({sizes}): the model's batch "
                                "is fixed and its image size is not; pass size=HxW in --preprocess")
            yield {name: np.stack(tensors)}, " + ".join(map(str, paths))

    def describe(self) -> str:
        plan = self._plan
        dims = (plan.channels, plan.height, plan.width) if plan.layout is Layout.NCHW else (
            plan.height, plan.width, plan.channels)
        values = ""
        if plan.dtype is ImageDtype.FLOAT32:
            values = f", mean={self._preprocess.mean}, std={self._preprocess.std}"
        return (f"image folder {self._path}/ ({len(self._images)} images as {plan.batch}x{shape_text(dims)} "
                f"{plan.layout.value.upper()} {plan.dtype.value}{values})")
