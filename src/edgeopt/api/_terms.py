"""The command line's option names in the errors a Python caller gets, with their Python names.

edgeopt's errors speak the command line's language ("give --data", "pass --force"), which is what the
README and most users read, and one message serves both. An error leaving a Python API function gains,
at its end, the Python name of each option it names -- ``(in Python: --data is data, --force is
force=True)`` -- so a script's author knows which argument to change; under the command line
(:func:`command_line`) nothing is added.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator
from typing import TypeVar

from edgeopt.errors import EdgeoptError

__all__ = ["command_line", "python_terms"]

Function = TypeVar("Function", bound=Callable)

# each option the library's messages name -> what a Python caller sets instead
_PYTHON_NAMES = {
    "--data": "data", "--eval": "evaluate", "--eval-data": "eval_data", "--max-samples": "max_samples",
    "--preprocess": "preprocess", "--input-shape": "input_shapes", "--input": "inputs",
    "-o": "output", "-o/--output": "output", "--output": "output", "--force": "force=True",
    "--scheme": "the config's type (Int8Config, Fp16Config, ...)", "--target": "target",
    "--exclude": "exclude", "--calibration": "calibration", "--per-tensor": "weight_granularity=PerTensor()",
    "--equalize": "equalize=True", "--equalize-relu6": "equalize_relu6=True", "--adaround": "adaround=True",
    "--gptq": "gptq=True", "--depthwise-gptq": "depthwise_gptq=True",
    "--no-depthwise-gptq": "depthwise_gptq=False", "--no-bias-correct": "bias_correct=False",
    "--smoothquant": "smoothquant_alpha", "--fallback": "fallback",
    "--embeddings": "embeddings", "--block-size": "PerBlock(size=...)",
    "--max-drop": "AccuracyGoal(max_drop=...)", "--min-sqnr": "AccuracyGoal(min_sqnr_db=...)",
    "--time-budget": "AccuracyGoal(time_budget_s=...)", "--max-float-nodes": "AccuracyGoal(max_float_nodes=...)",
    "--runs": "BenchConfig(runs=...)", "--warmup": "BenchConfig(warmup=...)", "--threads": "BenchConfig(threads=...)",
    "--name": "name", "--rounding": "rounding", "--device": "device",
}
_OPTION = re.compile(r"(?<![\w/-])(-o/--output|--[a-z][a-z0-9]*(?:-[a-z0-9]+)*|-o)(?![\w-])")
_MARK = " (in Python: "

_on_command_line = False  # set by the command line for the length of a command


@contextlib.contextmanager
def command_line() -> Iterator[None]:
    """Inside, errors keep the command line's words alone (the CLI runs every command in one)."""
    global _on_command_line
    before, _on_command_line = _on_command_line, True
    try:
        yield
    finally:
        _on_command_line = before


def in_python_terms(message: str, renamed: dict[str, str]) -> str:
    """``message`` with the Python names of the options it names appended (``renamed`` first: one
    function's own parameter names, ``-o`` being ``out_dir`` there)."""
    if _MARK in message:  # an API function calling another
        return message
    named = dict.fromkeys(match.group(1) for match in _OPTION.finditer(message))
    terms = [f"{option} is {renamed.get(option) or _PYTHON_NAMES[option]}" for option in named
             if option in renamed or option in _PYTHON_NAMES]
    return f"{message}{_MARK}{', '.join(terms)})" if terms else message


def python_terms(**renamed: str) -> Callable[[Function], Function]:
    """Decorate a public API function: an :class:`EdgeoptError` leaving it, outside the command line,
    names the Python arguments of the options its message names. ``renamed`` maps an option to this
    function's own argument where it differs (``**{"-o": "out_dir"}``)."""
    def decorate(function: Function) -> Function:
        @functools.wraps(function)
        def call(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except EdgeoptError as error:
                if not _on_command_line and error.args and isinstance(error.args[0], str):
                    error.args = (in_python_terms(error.args[0], renamed), *error.args[1:])
                raise
        return call  # type: ignore[return-value]
    return decorate
