"""claim_name: the one rule for the names edgeopt adds or gives."""

from __future__ import annotations

from edgeopt.naming import claim_name


def test_a_free_base_is_itself_and_a_taken_one_takes_the_first_free_suffix():
    taken = {"conv", "conv_1", "relu"}
    assert claim_name("add", taken) == "add"
    assert claim_name("conv", taken) == "conv_2"
    assert claim_name("conv", taken) == "conv_3"  # each name claimed is taken from then on
    assert taken == {"conv", "conv_1", "conv_2", "conv_3", "relu", "add"}
