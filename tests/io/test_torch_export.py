"""edgeopt.from_torch: a torch module in, a loaded ONNX model out, matching torch."""

from __future__ import annotations

import numpy as np
import torch

import edgeopt
from edgeopt import ir as eir
from edgeopt.runtime.ort import OrtSession
from tests.models import build_torch


def test_from_torch_exports_loads_and_matches(tmp_path):
    module, example = build_torch("mobilenet_v3")
    module.train()
    model = edgeopt.from_torch(module, example, path=tmp_path / "m.onnx", input_names=["image"])
    assert module.training, "the module's train/eval flag is restored"
    assert (tmp_path / "m.onnx").is_file()
    assert [spec.name for spec in eir.model_inputs(model)] == ["image"]
    module.eval()
    with torch.no_grad():
        expected = module(example).numpy()
    got = next(iter(OrtSession(model).run({"image": example.numpy()}).values()))
    np.testing.assert_allclose(got, expected, atol=1e-4)
