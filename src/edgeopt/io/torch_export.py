"""PyTorch entry point: export a ``torch.nn.Module`` to ONNX and load it.

torch is an optional dependency (``pip install edgeopt[torch]``); it is
imported only when this is called. The module is exported in eval mode with
TorchScript-based export (``dynamo=False``), which supports opsets 11 and up
and exports in a second where the dynamo exporter takes several.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir

from edgeopt.errors import ConfigError, ModelError
from edgeopt.io.load import load_model
from edgeopt.io.save import atomic_write_bytes

__all__ = ["export_torch"]


def _import_torch():
    try:
        import torch
    except ImportError:
        raise ConfigError("from_torch needs PyTorch: pip install 'edgeopt[torch]'") from None
    return torch


def _as_tuple(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def export_torch(module, example_inputs, *, path: str | os.PathLike | None = None, opset: int = 17,
                 input_names: Sequence[str] | None = None,
                 output_names: Sequence[str] | None = None) -> ir.Model:
    """Export ``module`` (eval mode, training flag restored) and return the loaded model."""
    torch = _import_torch()
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"from_torch exports a torch.nn.Module, got {type(module).__name__}")
    was_training = module.training
    module.eval()
    try:
        with tempfile.TemporaryDirectory() as folder:
            temp_path = Path(folder, "model.onnx")
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(module, _as_tuple(example_inputs), str(temp_path), opset_version=opset,
                                  input_names=list(input_names) if input_names else None,
                                  output_names=list(output_names) if output_names else None,
                                  dynamo=False)
            if path is not None:
                atomic_write_bytes(path, temp_path.read_bytes())
            return load_model(temp_path)
    except (RuntimeError, ValueError, TypeError) as error:
        raise ModelError(f"torch export failed: {str(error).splitlines()[0]}") from None
    finally:
        module.train(was_training)
