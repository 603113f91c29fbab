"""Typed int8 configuration and dispatch on config types."""

from __future__ import annotations

import dataclasses

import pytest

from edgeopt.errors import ConfigError
from edgeopt.quant import (
    CalibrationConfig,
    CalibrationMethod,
    Int8Config,
    PerBlock,
    PerChannel,
    PerTensor,
    Target,
    format_named,
    quantize,
)
from edgeopt.quant.formats import INT8, INT32, UINT8
from edgeopt.quant.int8 import quantize_int8
from edgeopt.quant.registry import QuantResult, handler_for, register_scheme, registered_schemes

from .int8_models import GraphBuilder


def test_the_target_decides_the_activation_type():
    assert Int8Config().activations is UINT8  # ONNX Runtime on x86: u8 activations x s8 weights
    assert Int8Config(target=Target.MCU).activations is INT8  # TFLite int8 scheme
    assert Int8Config(target=Target.MCU, activation_format=UINT8).activations is UINT8
    assert Int8Config(activation_format=INT8).calibration_config.activation_format is INT8


def test_defaults_follow_the_contract():
    config = Int8Config()
    assert config.weight_granularity == PerChannel()
    # the most faithful setting the benchmark measured (BENCHMARKS.md); the others are opt-in
    assert config.calibration is CalibrationMethod.PERCENTILE and config.percentile == 99.999
    assert config.bias_correct and not (config.equalize or config.adaround or config.smoothquant_alpha)
    assert dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen


def test_enum_settings_take_the_command_line_spelling():
    """The API mirrors the CLI: --calibration mse is calibration="mse"; the field holds the member."""
    config = Int8Config(target="mcu", calibration="MSE")
    assert config.target is Target.MCU and config.calibration is CalibrationMethod.MSE
    assert config == Int8Config(target=Target.MCU, calibration=CalibrationMethod.MSE)
    assert CalibrationConfig(method="entropy").method is CalibrationMethod.ENTROPY


@pytest.mark.parametrize("arguments, fragment", [
    ({"target": "x86"}, "target must be one of Target.ORT ('ort'), Target.MCU ('mcu'), got 'x86'"),
    ({"calibration": "kl"}, "CalibrationMethod.ENTROPY ('entropy')"),
    ({"calibration": 3}, "got 3"),
    ({"percentile": 40.0}, "percentile must be in (50, 100]"),
    ({"num_bins": 100}, "num_bins"),
    ({"weight_granularity": PerChannel(axis=1)}, "use PerChannel()"),
    ({"weight_granularity": PerBlock(size=32)}, "PerTensor() or PerChannel()"),
    ({"activation_format": INT32}, "activation_format (None: from the target) must be edgeopt.UINT8"),
    ({"exclude": "Conv"}, "exclude must be a list"),
    ({"verify_tolerance": 0.0}, "verify_tolerance"),
])
def test_invalid_settings_are_config_errors(arguments, fragment):
    with pytest.raises(ConfigError, match=None) as error:
        Int8Config(**arguments)
    assert fragment in str(error.value)


def test_exclude_takes_a_list_as_users_write_it():
    # a list was refused ("must be a tuple") though it is what Python users pass
    assert Int8Config(exclude=["Conv", "head"]).exclude == ("Conv", "head")
    assert hash(Int8Config(exclude=["Conv"])) == hash(Int8Config(exclude=("Conv",)))


def test_granularity_values_validate():
    assert PerTensor() == PerTensor() and PerChannel(axis=0) != PerChannel()
    with pytest.raises(ConfigError):
        PerBlock(size=24)
    with pytest.raises(ConfigError):
        CalibrationConfig(activation_format=INT32)


def test_format_names_resolve_or_list_the_known_ones():
    assert format_named("uint8") is UINT8
    with pytest.raises(ConfigError, match="use one of int8_symmetric, int8, uint8"):
        format_named("uint7")


def test_dispatch_is_on_the_config_type():
    assert handler_for(Int8Config()) is quantize_int8
    assert Int8Config in registered_schemes()

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class UnknownConfig:
        bits: int = 3

    with pytest.raises(ConfigError, match="no quantization scheme takes a UnknownConfig"):
        quantize(GraphBuilder().model(["y"], [1]), UnknownConfig())


def test_a_new_scheme_is_a_config_and_a_handler():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class IdentityConfig:
        pass

    seen = []

    @register_scheme(IdentityConfig)
    def identity(model, config, data, *, progress=None):
        seen.append(model)
        return QuantResult(model=model, scheme="identity")

    builder = GraphBuilder()
    builder.node("Relu", ["x"], "y")
    model = builder.model(["y"], [1, 4])
    result = quantize(model, IdentityConfig())
    assert result.scheme == "identity" and seen[0] is not model  # the handler gets a private copy
    with pytest.raises(TypeError, match="already registered"):
        register_scheme(IdentityConfig)(lambda *a, **k: None)


def test_a_mistyped_exclude_suggests_the_op_type_or_node_meant():
    # "similar node names" listed the first five nodes of the model, whatever was typed
    import edgeopt
    from edgeopt.demo import demo_model_path

    for typed, meant in (("Convv", "did you mean op type Conv"), ("gemm", "did you mean op type Gemm"),
                         ("/classifier/Gem", "did you mean /classifier/Gemm")):
        with pytest.raises(ConfigError, match=meant):
            edgeopt.quantize(demo_model_path(), edgeopt.Fp16Config(exclude=(typed,)), check_speed=False)
    with pytest.raises(ConfigError, match="its op types are .*Conv.*; node names are like"):
        edgeopt.quantize(demo_model_path(), edgeopt.Fp16Config(exclude=("xyzzy",)), check_speed=False)


def test_a_percentile_or_histogram_size_the_method_never_reads_is_refused():
    # Int8Config(calibration="minmax", percentile=99.9) changed nothing, silently
    with pytest.raises(ConfigError, match="percentile applies to calibration='percentile', not 'minmax'"):
        Int8Config(calibration="minmax", percentile=99.9)
    with pytest.raises(ConfigError, match="'minmax' keeps none"):
        Int8Config(calibration="minmax", num_bins=4096)
    assert Int8Config(calibration="mse", num_bins=4096).calibration_config.num_bins == 4096
