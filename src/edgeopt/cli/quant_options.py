"""The options of `edgeopt quantize` that pick the scheme and its settings, and the config they make."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from edgeopt.errors import ConfigError

__all__ = ["BLOCK_SIZE", "DEFAULT_TIME_BUDGET", "CalibrationChoice", "EmbeddingsChoice", "FallbackChoice",
           "Int8Algorithms", "Scheme", "TargetChoice", "quant_config"]


class Scheme(str, enum.Enum):
    int8 = "int8"
    uint8 = "uint8"
    fp16 = "fp16"
    bf16 = "bf16"
    int4_weight = "int4-weight"
    int8_dynamic = "int8-dynamic"


BLOCK_SIZE = 32  # --block-size's default
DEFAULT_TIME_BUDGET = "10m"  # --time-budget's


class TargetChoice(str, enum.Enum):
    ort = "ort"
    mcu = "mcu"


class FallbackChoice(str, enum.Enum):
    float = "float"
    fp16 = "fp16"  # int8, uint8
    int8 = "int8"  # int4-weight


class EmbeddingsChoice(str, enum.Enum):
    int8 = "int8"
    int4 = "int4"
    float = "float"


class CalibrationChoice(str, enum.Enum):
    minmax = "minmax"
    percentile = "percentile"
    entropy = "entropy"
    mse = "mse"
    auto = "auto"


@dataclass(frozen=True, kw_only=True)
class Int8Algorithms:
    """The accuracy algorithms switched on from the command line, and what the nodes kept out of int8 compute in."""

    equalize: bool
    equalize_relu6: bool
    bias_correct: bool
    adaround: bool
    gptq: bool
    smoothquant_alpha: float | None
    depthwise_gptq: bool | None = None  # None: when it costs little
    fallback: FallbackChoice = FallbackChoice.float
    embeddings: EmbeddingsChoice | None = None  # int4-weight's; None: its default


def quant_config(scheme: Scheme, target: TargetChoice, calibration: CalibrationChoice, per_tensor: bool,
                 exclude: tuple[str, ...], block_size: int | None, algorithms: Int8Algorithms):
    """The config of ``scheme`` from the command line's options; an option it would ignore is an error."""
    from edgeopt import quant
    from edgeopt.quant.float16 import Bf16Config, Fp16Config
    from edgeopt.quant.int4 import Int4WeightConfig

    _refuse_options_of_other_schemes(scheme, target, calibration, per_tensor, block_size, algorithms)
    if scheme in (Scheme.int8, Scheme.uint8):
        return quant.Int8Config(
            target=quant.Target[target.name.upper()], calibration=quant.CalibrationMethod[calibration.name.upper()],
            weight_granularity=quant.PerTensor() if per_tensor else quant.PerChannel(),
            activation_format=quant.format_named("uint8") if scheme is Scheme.uint8 else None, exclude=exclude,
            equalize=algorithms.equalize or algorithms.equalize_relu6, equalize_relu6=algorithms.equalize_relu6,
            bias_correct=algorithms.bias_correct, adaround=algorithms.adaround, gptq=algorithms.gptq,
            depthwise_gptq=algorithms.depthwise_gptq, smoothquant_alpha=algorithms.smoothquant_alpha,
            fallback=algorithms.fallback.value)
    if scheme is Scheme.int8_dynamic:
        from edgeopt.quant.dynamic import DynamicInt8Config

        return DynamicInt8Config(weight_granularity=quant.PerTensor() if per_tensor else quant.PerChannel(),
                                 exclude=exclude, smoothquant_alpha=algorithms.smoothquant_alpha,
                                 embeddings=algorithms.embeddings is not EmbeddingsChoice.float)
    if scheme is Scheme.fp16:
        return Fp16Config(exclude=exclude)
    if scheme is Scheme.bf16:
        return Bf16Config(exclude=exclude)
    size = BLOCK_SIZE if block_size is None else block_size
    return Int4WeightConfig(granularity=quant.PerBlock(size=size), exclude=exclude, gptq=algorithms.gptq,
                            fallback=algorithms.fallback.value,
                            embeddings=(algorithms.embeddings or EmbeddingsChoice.int8).value)


def _refuse_options_of_other_schemes(scheme: Scheme, target: TargetChoice, calibration: CalibrationChoice,
                                     per_tensor: bool, block_size: int | None,
                                     algorithms: Int8Algorithms) -> None:
    """An option the chosen scheme would silently ignore is an error: the user meant something by it."""
    int8 = scheme in (Scheme.int8, Scheme.uint8)
    dynamic = scheme is Scheme.int8_dynamic
    fallback_of = {FallbackChoice.fp16: (Scheme.int8, Scheme.uint8), FallbackChoice.int8: (Scheme.int4_weight,)}
    if scheme not in fallback_of.get(algorithms.fallback, (scheme,)):
        schemes = " and ".join(s.value for s in fallback_of[algorithms.fallback])
        raise ConfigError(f"--fallback {algorithms.fallback.value} applies to --scheme {schemes} only, not "
                          f"{scheme.value}: drop it")
    if dynamic and target is not TargetChoice.ort:
        raise ConfigError("--scheme int8-dynamic quantizes activations as ONNX Runtime runs the model; a "
                          "microcontroller needs them calibrated ahead of time: use --scheme int8 --target mcu "
                          "with --data")
    if dynamic and algorithms.embeddings is EmbeddingsChoice.int4:
        raise ConfigError("--embeddings int4 applies to --scheme int4-weight; int8-dynamic holds embedding tables "
                          "in int8 or float: give --embeddings int8 or float")
    depthwise_option = "--depthwise-gptq" if algorithms.depthwise_gptq else "--no-depthwise-gptq"
    given = {
        "--target": target is not TargetChoice.ort, "--calibration": calibration is not CalibrationChoice.percentile,
        "--per-tensor": per_tensor and not dynamic, "--equalize": algorithms.equalize,
        "--equalize-relu6": algorithms.equalize_relu6, "--no-bias-correct": not algorithms.bias_correct,
        depthwise_option: algorithms.depthwise_gptq is not None,
        "--adaround": algorithms.adaround, "--smoothquant": algorithms.smoothquant_alpha is not None and not dynamic,
    } if not int8 else {}
    if scheme is not Scheme.int4_weight:
        given["--block-size"] = block_size is not None
        given["--embeddings"] = algorithms.embeddings is not None and not dynamic
        if not int8:
            given["--gptq"] = algorithms.gptq
    ignored = [option for option, set_ in given.items() if set_]
    if ignored:
        applies = {"--block-size": "int4-weight", "--embeddings": "int4-weight and int8-dynamic",
                   "--gptq": "int8, uint8 and int4-weight", "--per-tensor": "int8, uint8 and int8-dynamic",
                   "--smoothquant": "int8, uint8 and int8-dynamic"}.get(ignored[0], "int8 and uint8")
        raise ConfigError(f"{ignored[0]} applies to --scheme {applies} only, not {scheme.value}: drop it")
