"""edgeopt: make trained neural networks small, low-bit, fast and deployable on edge devices.

The top-level functions mirror the CLI commands (see :mod:`edgeopt.api`), and
the configurations they take are here too, so a script needs one import::

    import edgeopt

    report = edgeopt.quantize("model.onnx", edgeopt.Int8Config(), "calib/", output="model.int8.onnx")
"""

__version__ = "0.1.0"

from edgeopt.api import (  # noqa: E402
    bench,
    compare,
    compile_model,
    from_torch,
    inspect,
    load,
    quantize,
    run,
    verify,
)
from edgeopt.bench import BenchConfig  # noqa: E402
from edgeopt.data import ImagePreprocess  # noqa: E402
from edgeopt.quant.accuracy import AccuracyGoal  # noqa: E402
from edgeopt.quant.config import (  # noqa: E402
    CalibrationMethod,
    Int8Config,
    PerBlock,
    PerChannel,
    PerTensor,
    Target,
)
from edgeopt.quant.float16 import Bf16Config, Fp16Config  # noqa: E402
from edgeopt.quant.formats import INT8, UINT8  # noqa: E402  (Int8Config(activation_format=UINT8): --scheme uint8)
from edgeopt.quant.int4 import Int4WeightConfig  # noqa: E402

__all__ = [
    "AccuracyGoal",
    "BenchConfig",
    "Bf16Config",
    "CalibrationMethod",
    "Fp16Config",
    "INT8",
    "ImagePreprocess",
    "Int4WeightConfig",
    "Int8Config",
    "PerBlock",
    "PerChannel",
    "PerTensor",
    "Target",
    "UINT8",
    "__version__",
    "bench",
    "compare",
    "compile_model",
    "from_torch",
    "inspect",
    "load",
    "quantize",
    "run",
    "verify",
]
