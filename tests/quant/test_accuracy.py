"""Accuracy-aware search: the most damaging nodes go back to float until the goal is met."""

from __future__ import annotations

import math

from edgeopt.quant.accuracy import AccuracyGoal, accuracy_aware_quantize
from edgeopt.quant.config import Int8Config
from tests.quant.int8_models import GraphBuilder, batches


def _conv_classifier():
    """Conv -> Relu -> Conv -> Relu -> global pool -> Flatten -> Gemm, whose output is the graph's."""
    g = GraphBuilder(seed=3)
    x = g.node("Relu", [g.conv("x", 3, 8, "conv1")], "relu1")
    x = g.node("Relu", [g.conv(x, 8, 8, "conv2")], "relu2")
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x], "pool")], "flat")
    logits = g.node("Gemm", [x, g.weight("fc.weight", (10, 8)), g.weight("fc.bias", (10,), 0.1)], "fc",
                    transB=1)
    return g.model([logits], (1, 3, 8, 8))


def test_the_node_writing_a_graph_output_can_go_back_to_float():
    # An unreachable goal returns every quantized node to float, the last layer too (it is compared
    # as a model output, not as a layer): the search ends with the float model's exact outputs.
    search = accuracy_aware_quantize(_conv_classifier(), Int8Config(), batches((1, 3, 8, 8), 16),
                                     AccuracyGoal(min_sqnr_db=200.0))
    assert search.met and math.isinf(search.best_score)
    assert "fc" in search.best_excluded
    assert not any(node.op_type == "QuantizeLinear" for node in search.result.model.graph)


def test_a_reachable_goal_keeps_the_rest_quantized():
    search = accuracy_aware_quantize(_conv_classifier(), Int8Config(), batches((1, 3, 8, 8), 16),
                                     AccuracyGoal(min_sqnr_db=0.0))
    assert search.met and search.best_excluded == () and len(search.steps) == 1
    assert any(node.op_type == "QuantizeLinear" for node in search.result.model.graph)


def test_a_float_node_is_never_a_step_its_quantized_readers_are():
    # Tanh has no integer kernel: its output is quantized only because conv2 reads it. Returning
    # Tanh to float would change nothing, so the search returns its reader instead; the nodes it
    # returned say so (they are not the user's --exclude).
    g = GraphBuilder(seed=4)
    x = g.node("Tanh", [g.conv("x", 3, 8, "conv1")], "tanh")
    x = g.node("Relu", [g.conv(x, 8, 8, "conv2")], "relu2")
    logits = g.node("Gemm", [g.node("Flatten", [g.node("GlobalAveragePool", [x], "pool")], "flat"),
                             g.weight("fc.weight", (10, 8)), g.weight("fc.bias", (10,), 0.1)], "fc", transB=1)
    search = accuracy_aware_quantize(g.model([logits], (1, 3, 8, 8)), Int8Config(exclude=("pool",)),
                                     batches((1, 3, 8, 8), 16), AccuracyGoal(min_sqnr_db=200.0))
    assert search.met and "tanh" not in search.best_excluded and "conv2" in search.best_excluded
    assert all(step.next_node != "tanh" for step in search.steps)
    reasons = {node.node_name: node.reason for node in search.result.float_nodes}
    assert reasons["pool"] == "excluded (--exclude)" and reasons["tanh"] == "no integer kernel for Tanh"
    assert reasons["conv2"] == "returned to float by the accuracy search"
