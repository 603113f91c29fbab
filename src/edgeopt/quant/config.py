"""Typed configuration of int8 post-training quantization.

The contract (DESIGN.md, "Quantization semantics"): weights int8 symmetric
per output channel in [-127, 127]; activations 8-bit asymmetric per tensor;
bias int32 at ``input_scale * weight_scale``. The *target* decides the
activation type: ONNX Runtime on x86 runs u8 activations x s8 weights in its
fast integer kernels (s8-activation QDQ models are slower than float there),
so ``Target.ORT`` means uint8 activations; ``Target.MCU`` keeps the TFLite
int8 scheme. ``activation_format`` overrides the choice (``--scheme``).

Granularity is a value: :class:`PerTensor`, :class:`PerChannel` (``axis=None``
means the output-channel axis of the op that reads the weight: 0 for Conv,
1 for ConvTranspose, by ``transB`` for Gemm, the last for MatMul) or
:class:`PerBlock` (weight-only schemes).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Collection
from dataclasses import dataclass

from edgeopt._scalars import is_integer, is_number, plain_fields
from edgeopt.errors import ConfigError
from edgeopt.quant.formats import INT8, UINT8, Format

__all__ = [
    "CalibrationConfig",
    "CalibrationMethod",
    "Fallback",
    "Granularity",
    "Int8Config",
    "PerBlock",
    "PerChannel",
    "PerTensor",
    "Target",
    "check_exclude_names",
    "check_smoothquant_alpha",
    "is_excluded",
    "require_bools",
    "require_enum",
    "require_format",
]


def is_excluded(node, exclude: Collection[str]) -> bool:
    """Whether ``exclude`` (node names and op types, as ``--exclude`` takes them) names ``node`` or its op."""
    return node.name in exclude or node.op_type in exclude


def check_exclude_names(names: object) -> tuple[str, ...]:
    """``exclude`` as a tuple: a tuple or list of non-empty node names or op types, else a ConfigError."""
    if not isinstance(names, (tuple, list)) or not all(isinstance(name, str) for name in names):
        raise ConfigError(f"exclude must be a list of node names or op types, got {names!r}")
    if not all(name.strip() for name in names):
        raise ConfigError("--exclude got an empty name: give node names or op types (see edgeopt inspect)")
    return tuple(names)


class Target(enum.Enum):
    """Where the quantized model runs."""

    ORT = "ort"  # ONNX Runtime on CPU (x86: u8 activations x s8 weights)
    MCU = "mcu"  # microcontrollers: TFLite/CMSIS-NN int8 scheme


class Fallback(enum.Enum):
    """What the nodes an int8 model keeps out of int8 compute in."""

    FLOAT = "float"  # float32, as in the float model
    FP16 = "fp16"  # float16 weights and compute, where float16 holds their values (edgeopt.quant.float16)


class CalibrationMethod(enum.Enum):
    """How an activation's range is chosen from the calibration data."""

    MINMAX = "minmax"  # smallest and largest value seen
    PERCENTILE = "percentile"  # drop the outermost (100 - p)% of each tail
    ENTROPY = "entropy"  # KL-divergence threshold (TensorRT)
    MSE = "mse"  # least expected quantization + clipping error
    AUTO = "auto"  # per tensor, the range of least estimated error (nearly always MSE's, which minimizes it)

    @property
    def needs_histogram(self) -> bool:
        return self is not CalibrationMethod.MINMAX


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""


@dataclass(frozen=True, kw_only=True)
class PerChannel:
    """One scale per slice along ``axis`` (None: the op's output-channel axis)."""

    axis: int | None = None

    def __post_init__(self) -> None:
        plain_fields(self)
        if self.axis is not None and not is_integer(self.axis):
            raise ConfigError(f"PerChannel axis must be an integer or None, got {self.axis!r}")


@dataclass(frozen=True, kw_only=True)
class PerBlock:
    """One scale per ``size`` consecutive values along the reduction axis (16 to 256, a power of two)."""

    size: int = 32

    def __post_init__(self) -> None:
        plain_fields(self)
        if not is_integer(self.size) or self.size not in _BLOCK_SIZES:
            raise ConfigError(f"block size (--block-size) must be one of {', '.join(map(str, _BLOCK_SIZES))} "
                              f"(what ONNX Runtime's MatMulNBits runs), got {self.size!r}")


_BLOCK_SIZES = (16, 32, 64, 128, 256)

Granularity = PerTensor | PerChannel | PerBlock

_ACTIVATION_FORMATS = (UINT8, INT8)


def require_bools(config: object, *fields: str) -> None:
    """ConfigError for a field of ``config`` that is not True or False (a string such as "no" would count as
    true)."""
    for field in fields:
        value = getattr(config, field)
        if not isinstance(value, bool):
            raise ConfigError(f"{field} must be True or False, got {value!r}")


def check_smoothquant_alpha(alpha: object) -> None:
    """ConfigError unless ``alpha`` (SmoothQuant's migration strength, ``--smoothquant``) is None or in (0, 1)."""
    if alpha is not None and (not is_number(alpha) or not 0.0 < alpha < 1.0):
        raise ConfigError(f"smoothquant alpha must be in (0, 1), got {alpha!r}")


def require_enum(config: object, field: str, enum_type: type[enum.Enum], key: str) -> None:
    """``config.field`` as a member of ``enum_type``; its value spelled as on the command line (``"mse"``)
    becomes that member, as the API mirrors the CLI."""
    value = getattr(config, field)
    if isinstance(value, str):
        value = next((member for member in enum_type if member.value == value.lower()), value)
        object.__setattr__(config, field, value)
    if not isinstance(value, enum_type):
        allowed = ", ".join(f"{enum_type.__name__}.{m.name} ({m.value!r})" for m in enum_type)
        raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")


def require_format(config: object, field: str, allowed: tuple[Format, ...], key: str) -> None:
    """``config.field`` as one of the ``allowed`` formats (None passes: the caller's default); its name
    (``"uint8"``, as ``--scheme`` spells it) becomes that format."""
    value = getattr(config, field)
    if isinstance(value, str):
        value = next((fmt for fmt in allowed if fmt.name == value.lower()), value)
        object.__setattr__(config, field, value)
    if value is not None and value not in allowed:
        names = " or ".join(f"{fmt.name.upper()} ({fmt.name!r})" for fmt in allowed)
        given = f"{value.name} (a Format)" if isinstance(value, Format) else repr(value)
        raise ConfigError(f"{key} must be edgeopt.{names}, got {given}")


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    """What one calibration pass observes and how it turns statistics into ranges.

    ``activation_format`` sets the number of levels the entropy and MSE
    searches assume.
    """

    method: CalibrationMethod = CalibrationMethod.MINMAX
    percentile: float = 99.999
    num_bins: int = 2048
    activation_format: Format = UINT8

    def __post_init__(self) -> None:
        plain_fields(self)
        require_enum(self, "method", CalibrationMethod, "calibration method")
        if not is_number(self.percentile) or not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile!r}")
        if not is_integer(self.num_bins) or self.num_bins < 256 or self.num_bins % 2:
            raise ConfigError(f"num_bins must be an even integer >= 256, got {self.num_bins!r}")
        if self.activation_format is None:
            raise ConfigError("activation_format of a calibration must be UINT8 or INT8, got None")
        require_format(self, "activation_format", _ACTIVATION_FORMATS, "activation_format")


@dataclass(frozen=True, kw_only=True)
class Int8Config:
    """Int8 post-training quantization to a QDQ model.

    ``exclude`` names nodes (by node name or op type) that stay float.
    ``equalize`` (cross-layer equalization), ``bias_correct`` (empirical bias
    correction), ``adaround`` (learned weight rounding), ``gptq`` (weight
    rounding with error feedback, :mod:`edgeopt.quant.gptq`) and
    ``smoothquant_alpha`` (SmoothQuant migration strength for MatMul/Gemm
    inputs) switch on the accuracy algorithms. The defaults, percentile
    calibration with bias correction, are the most faithful setting measured
    across the benchmark's CNNs and transformer (BENCHMARKS.md) at a
    calibration cost still well under ONNX Runtime's; equalization is mixed
    (it helps some depthwise nets, costs others), AdaRound costs 20-50x the
    time for a few tenths of a dB, so both are opt-in; GPTQ reaches AdaRound's
    figures at 1.5-3.4x the default's time (``benchmarks/rounding.py``) and is opt-in as well (at most one
    of the two). ``depthwise_gptq`` rounds the depthwise convolutions alone by GPTQ, from statistics of
    the calibration pass (:mod:`edgeopt.quant.depthwise_rounding`): a smaller gain than ``gptq``'s at
    10-27 % more time on 224x224 MobileNetV2, but 20-150 % more calibration time on 32x32 nets. None (the
    default) rounds them so when the statistics' multiply-adds are at most 2 % of the model's
    (``depthwise_rounding.statistics_share``: 1.5 % on that MobileNetV2, 28-170 % on those nets) and
    neither ``gptq`` nor ``adaround`` is set (they round those layers with the rest); True always (not
    with those two), False never.
    ``equalize_relu6``
    (with ``equalize``) equalizes through ReLU6 too by turning each such
    ReLU6 into a ReLU (Nagel et al.'s recipe for MobileNetV2; it changes the
    float model wherever a pre-activation exceeded 6, and is reported).
    ``activation_format`` None means: chosen by ``target`` (ORT: uint8,
    MCU: int8). ``quantize_outputs`` None means: chosen by ``target`` too. For
    ORT, a graph output written by a Gemm or a MatMul with a constant weight
    stays float (no Q/DQ after it): ONNX Runtime fuses the pair into QGemm /
    MatMulIntegerToFloat with a float output, so the logits are not rounded to
    256 levels at no cost in speed; the MCU scheme quantizes every output (the
    C kernels write int8). ``verify_tolerance`` is the largest relative output
    change accepted when an opset < 13 model is converted to 13. ``fallback``:
    what the nodes kept out of int8 (excluded, returned by the accuracy search,
    or without an integer kernel) compute in: float32, or float16 where it holds
    their values (``Fallback.FP16``, ``"fp16"``: their weights half the size, for
    runtimes with float16 kernels; the model's inputs and outputs stay float32).
    """

    target: Target = Target.ORT
    calibration: CalibrationMethod = CalibrationMethod.PERCENTILE
    weight_granularity: PerTensor | PerChannel = PerChannel()
    activation_format: Format | None = None
    exclude: tuple[str, ...] = ()
    percentile: float = 99.999
    num_bins: int = 2048
    verify_tolerance: float = 1e-4
    equalize: bool = False
    equalize_relu6: bool = False
    bias_correct: bool = True
    adaround: bool = False
    gptq: bool = False
    depthwise_gptq: bool | None = None
    smoothquant_alpha: float | None = None
    quantize_outputs: bool | None = None
    fallback: Fallback = Fallback.FLOAT

    def __post_init__(self) -> None:
        plain_fields(self)
        require_enum(self, "target", Target, "target")
        require_enum(self, "fallback", Fallback, "fallback")
        if self.quantize_outputs is not None and not isinstance(self.quantize_outputs, bool):
            raise ConfigError(f"quantize_outputs must be True, False or None (from the target), "
                              f"got {self.quantize_outputs!r}")
        require_bools(self, "equalize", "equalize_relu6", "bias_correct", "adaround", "gptq")
        if self.depthwise_gptq is not None and not isinstance(self.depthwise_gptq, bool):
            raise ConfigError(f"depthwise_gptq must be True, False or None (when it costs little), "
                              f"got {self.depthwise_gptq!r}")
        if self.adaround and self.gptq:
            raise ConfigError("adaround and gptq (--adaround, --gptq) are two ways of rounding the weights: pick one")
        if self.depthwise_gptq and (self.adaround or self.gptq):
            given = "adaround (--adaround)" if self.adaround else "gptq (--gptq)"
            raise ConfigError(f"{given} rounds the depthwise convolutions too: drop depthwise_gptq "
                              "(--depthwise-gptq)")
        if self.equalize_relu6 and not self.equalize:
            raise ConfigError("equalize_relu6 (--equalize-relu6) is a way of equalizing: set equalize too")
        check_smoothquant_alpha(self.smoothquant_alpha)
        require_enum(self, "calibration", CalibrationMethod, "calibration")
        if not isinstance(self.weight_granularity, (PerTensor, PerChannel)):
            raise ConfigError("weight_granularity of int8 must be PerTensor() or PerChannel(), "
                              f"got {self.weight_granularity!r}")
        if isinstance(self.weight_granularity, PerChannel) and self.weight_granularity.axis is not None:
            raise ConfigError("int8 weights are quantized per output channel, whose axis each op decides "
                              "(Conv 0, ConvTranspose 1, Gemm by transB, MatMul last): use PerChannel()")
        require_format(self, "activation_format", _ACTIVATION_FORMATS, "activation_format (None: from the target)")
        object.__setattr__(self, "exclude", check_exclude_names(self.exclude))  # a list becomes a tuple
        if not is_number(self.verify_tolerance) or not math.isfinite(self.verify_tolerance) \
                or self.verify_tolerance <= 0:
            raise ConfigError(f"verify_tolerance must be a positive number, got {self.verify_tolerance!r}")
        _ = self.calibration_config  # validates percentile and num_bins
        self._check_unused_settings()

    def _check_unused_settings(self) -> None:
        """ConfigError for a percentile or a histogram size the calibration method never reads (given
        with minmax, a percentile of 99.9 changed nothing, silently)."""
        defaults = {field.name: field.default for field in dataclasses.fields(self)}
        if self.percentile != defaults["percentile"] and self.calibration is not CalibrationMethod.PERCENTILE:
            raise ConfigError(f"percentile applies to calibration='percentile', not {self.calibration.value!r}: "
                              "drop it, or choose percentile calibration")
        if self.num_bins != defaults["num_bins"] and not self.calibration.needs_histogram:
            raise ConfigError(f"num_bins sizes the histograms of percentile, entropy, mse and auto calibration; "
                              f"{self.calibration.value!r} keeps none: drop it")

    @property
    def activations(self) -> Format:
        """The activation format: the explicit override, else the target's."""
        if self.activation_format is not None:
            return self.activation_format
        return UINT8 if self.target is Target.ORT else INT8

    @property
    def outputs_quantized(self) -> bool:
        """Whether graph outputs of Gemm/MatMul get a Q/DQ pair: the explicit choice, else the target's."""
        return self.quantize_outputs if self.quantize_outputs is not None else self.target is Target.MCU

    @property
    def calibration_config(self) -> CalibrationConfig:
        return CalibrationConfig(method=self.calibration, percentile=self.percentile, num_bins=self.num_bins,
                                 activation_format=self.activations)
