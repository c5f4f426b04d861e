"""Hybrid selection keeps the layers with the highest stage-1 error as softmax."""

from __future__ import annotations

import pytest

from hf_linattn.conversion import hybrid_layer_types, select_softmax_layers

from .test_transfer import qwen2


def test_highest_errors_stay_softmax():
    errors = {0: 0.1, 1: 0.7, 2: 0.3, 3: 0.7, 4: 0.05}
    assert select_softmax_layers(errors, 1) == [1]  # tie with layer 3 breaks toward the lower index
    assert select_softmax_layers(errors, 3) == [1, 2, 3]
    assert select_softmax_layers(errors, 0) == []
    with pytest.raises(ValueError, match="keep must be between 0 and"):
        select_softmax_layers(errors, 6)


def test_kept_layers_keep_their_base_attention_type():
    config = qwen2().config  # layers 2 and 3 slide in this base
    assert hybrid_layer_types(config, "rdn", [0, 3]) == ["full_attention", "rdn", "rdn", "sliding_attention"]
    with pytest.raises(ValueError, match="out of range"):
        hybrid_layer_types(config, "rdn", [4])
    with pytest.raises(ValueError, match="unknown mode"):
        hybrid_layer_types(config, "mamba", [])
