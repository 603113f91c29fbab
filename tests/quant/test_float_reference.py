"""The float model's tensors kept for the rounds of a search: each sample's own, within a bound."""

from __future__ import annotations

import numpy as np
import pytest

from edgeopt.quant.compare import compare_models
from edgeopt.quant.float_reference import FloatReference
from edgeopt.runtime.ort import observing_session
from tests.quant.int8_models import GraphBuilder


def _model():
    g = GraphBuilder(seed=5)
    x = g.node("Relu", [g.conv("x", 3, 4, "conv1")], "relu1")
    return g.model([g.node("Relu", [g.conv(x, 4, 4, "conv2")], "relu2")], (1, 3, 6, 6))


def _feeds(count):
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)} for _ in range(count)]


def test_each_sample_gets_its_own_tensors_in_any_order_and_runs_once():
    # a data source may shuffle from one pass to the next: a sample is known by its values, not its place
    model, feeds = _model(), _feeds(3)
    names = ["relu2", "relu1"]
    reference = FloatReference(model)
    expected = [observing_session(model, ["relu1"]).run(feed, names) for feed in feeds]
    for order in ([0, 1, 2], [2, 0, 1]):
        for index in order:
            got = reference.run(feeds[index], names)
            assert all(np.array_equal(got[name], expected[index][name]) for name in names)
    assert reference.runs == 3


def test_tensors_beyond_the_bound_are_computed_again_and_a_new_name_rebuilds():
    model, feeds = _model(), _feeds(3)
    tensor_bytes = 4 * 6 * 6 * 4  # [1, 4, 6, 6] float32
    reference = FloatReference(model, max_bytes=3 * tensor_bytes)  # one sample's two tensors fit, not two's
    for _ in range(2):
        for feed in feeds:
            reference.run(feed, ["relu2", "relu1"])
    assert reference.runs == 1 + 2 * 2  # the first sample is kept, the two others run each pass
    assert reference.run(feeds[0], ["relu2"])["relu2"].flags.writeable is False
    reference.run(feeds[0], ["relu2", "conv1"])  # a tensor not exposed yet: the kept ones are dropped
    assert reference.runs == 6
    reference.run(feeds[0], ["conv1"])
    assert reference.runs == 6


def test_string_samples_are_known_by_their_text():
    from edgeopt.quant.float_reference import _fingerprint

    first, second = np.array(["a", "b"], dtype=object), np.array(["a", "c"], dtype=object)
    assert _fingerprint({"text": first}) == _fingerprint({"text": first.copy()})
    assert _fingerprint({"text": first}) != _fingerprint({"text": second})


def test_string_samples_that_would_join_alike_are_told_apart():
    # joined with a NUL, ["a\0b", "c"] and ["a", "b\0c"] were one sample, as were "1" and 1
    from edgeopt.quant.float_reference import _fingerprint

    first, second = np.array(["a\0b", "c"], dtype=object), np.array(["a", "b\0c"], dtype=object)
    assert _fingerprint({"text": first}) != _fingerprint({"text": second})
    for one, other in (("1", 1), (b"a", "b'a'")):
        assert _fingerprint({"text": np.array([one], dtype=object)}) != \
            _fingerprint({"text": np.array([other], dtype=object)})


def test_a_comparison_refuses_the_reference_of_another_float_model():
    # it would answer with that model's tensors: a comparison against the wrong float model, silently
    model, other = _model(), _model()
    with pytest.raises(ValueError, match="float_reference was made for another float model"):
        compare_models(model, model, _feeds(2), float_reference=FloatReference(other))
    assert compare_models(model, model, _feeds(2), float_reference=FloatReference(model)).samples == 2
