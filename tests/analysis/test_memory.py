"""Tensor lifetimes, the live-bytes lower bound and the greedy arena plan."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from edgeopt.analysis import (
    ArenaPlan,
    TensorLifetime,
    check_no_overlap,
    greedy_arena_plan,
    live_bytes_by_step,
    lower_bound_bytes,
    memory_report,
    tensor_lifetimes,
)
from edgeopt.errors import ConfigError
from edgeopt.io import load_model

FLOAT = TensorProto.FLOAT


def _info(name: str, shape, dtype=FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _load(tmp_path, nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)  # a well-formed model
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return load_model(path)


def _lifetime(name: str, size_bytes: int, start: int, end: int) -> TensorLifetime:
    return TensorLifetime(name=name, size_bytes=size_bytes, start=start, end=end)


def _by_name(lifetimes) -> dict[str, tuple[int, int, int]]:
    return {t.name: (t.size_bytes, t.start, t.end) for t in lifetimes}


@pytest.fixture
def chain(tmp_path):
    """x [1,4,16,16] -Relu-> a -MaxPool 2x2/2-> b [1,4,8,8] -Relu-> y; float32."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu0"),
        helper.make_node("MaxPool", ["a"], ["b"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Relu", ["b"], ["y"], name="relu1"),
    ]
    return _load(tmp_path, nodes, [_info("x", [1, 4, 16, 16])], [_info("y", None)])


@pytest.fixture
def diamond(tmp_path):
    """x [1,256] -Relu-> a; a -Sigmoid-> b; a -Tanh-> c; b + c -> y; every tensor 1024 bytes."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("Sigmoid", ["a"], ["b"], name="sigmoid"),
        helper.make_node("Tanh", ["a"], ["c"], name="tanh"),
        helper.make_node("Add", ["b", "c"], ["y"], name="add"),
    ]
    return _load(tmp_path, nodes, [_info("x", [1, 256])], [_info("y", None)])


def test_chain_lifetimes_bounds_and_plan(chain):
    big, small = 4 * 4 * 16 * 16, 4 * 4 * 8 * 8
    lifetimes = tensor_lifetimes(chain)
    assert _by_name(lifetimes) == {"x": (big, 0, 0), "a": (big, 0, 1), "b": (small, 1, 2), "y": (small, 2, 2)}
    assert live_bytes_by_step(lifetimes) == {0: big + big, 1: big + small, 2: small + small}
    assert lower_bound_bytes(lifetimes) == 8192
    plan = greedy_arena_plan(lifetimes)
    # a (largest, ties by start then name) at 0; x beside it; b over x's dead bytes; y back at 0.
    assert plan.offsets == {"a": 0, "x": 4096, "b": 4096, "y": 0}
    assert plan.arena_bytes == 8192 == plan.lower_bound_bytes
    assert check_no_overlap(plan, lifetimes) == ()


def test_chain_memory_report(chain):
    report = memory_report(chain)
    assert report.peak_activation_bytes == 8192
    assert report.lower_bound_bytes == 8192
    assert report.naive_bytes == 4096 + 4096 + 1024 + 1024
    assert report.largest_tensor_bytes == 4096 and report.largest_tensor in {"x", "a"}
    assert (report.peak_step, report.peak_node) == (0, "relu0")
    assert report.weight_bytes == report.param_bytes_fp32 == 0
    assert report.unknown_tensors == ()


def test_diamond_keeps_the_branch_input_alive_until_both_branches_ran(diamond):
    lifetimes = tensor_lifetimes(diamond)
    kb = 1024
    assert _by_name(lifetimes) == {"x": (kb, 0, 0), "a": (kb, 0, 2), "b": (kb, 1, 3), "c": (kb, 2, 3), "y": (kb, 3, 3)}
    # step 0: x a | step 1: a b | step 2: a b c | step 3: b c y
    assert live_bytes_by_step(lifetimes) == {0: 2 * kb, 1: 2 * kb, 2: 3 * kb, 3: 3 * kb}
    plan = greedy_arena_plan(lifetimes)
    assert plan.offsets == {"a": 0, "x": kb, "b": kb, "c": 2 * kb, "y": 0}
    assert plan.arena_bytes == plan.lower_bound_bytes == 3 * kb
    report = memory_report(diamond)
    assert (report.peak_activation_bytes, report.naive_bytes) == (3 * kb, 5 * kb)
    assert (report.peak_step, report.peak_node) == (2, "tanh")


def test_weights_and_constants_are_not_activations(tmp_path):
    weight = numpy_helper.from_array(np.ones((8, 4, 3, 3), np.float32), "w")
    nodes = [
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([1, -1], np.int64))),
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[3, 3]),
        helper.make_node("Reshape", ["c", "shape"], ["y"], name="flatten"),
    ]
    model = _load(tmp_path, nodes, [_info("x", [1, 4, 5, 5])], [_info("y", None)], [weight])
    assert _by_name(tensor_lifetimes(model)) == {"x": (400, 0, 0), "c": (288, 0, 1), "y": (288, 1, 1)}
    report = memory_report(model)
    assert report.weight_bytes == report.param_bytes_fp32 == 4 * 8 * 4 * 3 * 3
    assert (report.param_bytes_fp16, report.param_bytes_int8) == (2 * 288, 288)


def test_intermediate_graph_output_and_unread_output_lifetimes(tmp_path):
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("TopK", ["a", "k"], ["values", "indices"], name="topk"),
        helper.make_node("Neg", ["values"], ["y"], name="neg"),
    ]
    k = numpy_helper.from_array(np.array([2], np.int64), "k")
    model = _load(tmp_path, nodes, [_info("x", [1, 8])], [_info("a", None), _info("y", None)], [k])
    lifetimes = _by_name(tensor_lifetimes(model))
    assert lifetimes["a"] == (32, 0, 2)        # a graph output lives to the last step
    assert lifetimes["indices"] == (16, 1, 1)  # nobody reads it: live while written


def test_a_value_read_inside_an_if_branch_lives_until_the_if(tmp_path):
    then_branch = helper.make_graph([helper.make_node("Neg", ["a"], ["t"])], "then", [], [_info("t", [4])])
    else_branch = helper.make_graph([helper.make_node("Identity", ["s"], ["e"])], "else", [], [_info("e", [4])])
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("Sigmoid", ["x"], ["s"], name="sigmoid"),
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_branch, else_branch=else_branch),
    ]
    model = _load(tmp_path, nodes, [_info("x", [4]), _info("cond", [], TensorProto.BOOL)], [_info("y", [4])])
    lifetimes = _by_name(tensor_lifetimes(model))
    assert lifetimes["a"] == (16, 0, 2)
    assert lifetimes["s"] == (16, 1, 2)
    assert lifetimes["cond"] == (1, 0, 2)


def test_alignment_rounds_offsets_up():
    lifetimes = [_lifetime("p", 10, 0, 1), _lifetime("q", 10, 1, 2), _lifetime("r", 10, 2, 3)]
    plan = greedy_arena_plan(lifetimes, alignment=16)
    assert plan.offsets == {"p": 0, "q": 16, "r": 0}
    assert (plan.arena_bytes, plan.lower_bound_bytes) == (26, 20)
    assert greedy_arena_plan(lifetimes, alignment=1).arena_bytes == 20


def test_greedy_reuses_the_bytes_of_a_dead_tensor():
    lifetimes = [
        _lifetime("big_b", 100, 0, 3), _lifetime("gap", 60, 0, 0),
        _lifetime("big_a", 100, 0, 3), _lifetime("late", 50, 1, 3),
    ]
    plan = greedy_arena_plan(lifetimes, alignment=1)
    # big_a [0,100), big_b [100,200), gap [200,260); late reuses gap's bytes after step 0.
    assert plan.offsets == {"big_a": 0, "big_b": 100, "gap": 200, "late": 200}
    assert plan.arena_bytes == 260 == plan.lower_bound_bytes


def test_check_no_overlap_reports_conflicting_pairs():
    lifetimes = [_lifetime("p", 8, 0, 1), _lifetime("q", 8, 1, 2), _lifetime("r", 8, 2, 3)]
    plan = ArenaPlan(offsets={"p": 0, "q": 4, "r": 0}, arena_bytes=12, lower_bound_bytes=16, alignment=1)
    assert check_no_overlap(plan, lifetimes) == (("p", "q"), ("q", "r"))


def test_invalid_lifetimes_and_alignment_are_refused():
    with pytest.raises(ValueError):
        _lifetime("backwards", 4, 3, 2)
    with pytest.raises(ConfigError):
        greedy_arena_plan([], alignment=0)
    with pytest.raises(ValueError, match="twice"):
        greedy_arena_plan([_lifetime("t", 4, 0, 0), _lifetime("t", 4, 1, 1)])
    assert greedy_arena_plan([]).arena_bytes == 0
    assert lower_bound_bytes([]) == 0


lifetime_lists = st.lists(
    st.tuples(st.integers(0, 2000), st.integers(0, 30), st.integers(0, 10)),
    max_size=40,
).map(lambda rows: [_lifetime(f"t{i}", size, start, start + length) for i, (size, start, length) in enumerate(rows)])


@settings(max_examples=200, deadline=None)
@given(lifetimes=lifetime_lists, alignment=st.sampled_from([1, 4, 16, 64]))
def test_greedy_plan_is_valid_and_never_below_the_lower_bound(lifetimes, alignment):
    plan = greedy_arena_plan(lifetimes, alignment=alignment)
    assert check_no_overlap(plan, lifetimes) == ()
    assert set(plan.offsets) == {t.name for t in lifetimes}
    assert all(offset % alignment == 0 for offset in plan.offsets.values())
    assert plan.arena_bytes >= plan.lower_bound_bytes == lower_bound_bytes(lifetimes)
    assert plan.arena_bytes <= sum(-(-t.size_bytes // alignment) * alignment for t in lifetimes)
    assert all(plan.offsets[t.name] + t.size_bytes <= plan.arena_bytes for t in lifetimes)


@settings(max_examples=100, deadline=None)
@given(lifetimes=lifetime_lists)
def test_lower_bound_is_the_largest_live_set(lifetimes):
    steps = range(0, 41)
    brute_force = max((sum(t.size_bytes for t in lifetimes if t.start <= s <= t.end) for s in steps), default=0)
    assert lower_bound_bytes(lifetimes) == brute_force
