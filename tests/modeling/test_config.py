"""LinAttnConfig: defaults, Auto registration, and one clear error per invalid value."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from hf_linattn import LinAttnConfig, LinAttnForCausalLM, LinAttnModel

from .tiny import tiny_config


def test_defaults_follow_the_backbone():
    config = tiny_config(["rdn", "full_attention"])
    assert config.num_hidden_layers == 2
    assert config.head_dim == 8
    assert config.linear_num_heads == 4 and config.linear_num_key_value_heads == 2
    assert config.linear_key_head_dim == config.linear_value_head_dim == 8
    assert config.rope_parameters["rope_type"] == "default"


def test_round_trip_through_dict():
    config = tiny_config(["gla", "sliding_attention"], linear_value_head_dim=12, linear_use_rotary=True)
    again = LinAttnConfig.from_dict(config.to_dict())
    assert again.layer_types == config.layer_types
    assert again.linear_value_head_dim == 12 and again.linear_use_rotary


def test_auto_classes_are_registered():
    fields = {k: v for k, v in tiny_config(["rdn"]).to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("hf_linattn", **fields)
    assert isinstance(config, LinAttnConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), LinAttnForCausalLM)
    assert isinstance(AutoModel.from_config(config), LinAttnModel)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"layer_types": ["rdn", "mamba"]}, r"layer_types\[1\] = 'mamba' is not a known layer type"),
        ({"layer_types": ["rdn"], "num_hidden_layers": 3}, "must equal len"),
        ({"num_attention_heads": 5}, "hidden_size .* is not divisible by num_attention_heads"),
        ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads"),
        ({"linear_num_heads": 4, "linear_num_key_value_heads": 3}, "must be a multiple of linear_num_key_value_heads"),
        ({"linear_key_head_dim": 0}, "linear_key_head_dim must be a positive integer"),
        ({"layer_types": ["sliding_attention"], "sliding_window": None}, "need sliding_window"),
        ({"residual_clip": -1.0}, "residual_clip must be > 0"),
        ({"hidden_act": "gelu"}, "hidden_act must be 'silu'"),
        ({"head_dim": 7}, "head_dim .* must be even"),
        ({"linear_use_rotary": True, "linear_key_head_dim": 4}, "linear_use_rotary needs"),
    ],
)
def test_invalid_values_fail_at_construction(overrides, message):
    layer_types = overrides.pop("layer_types", ["rdn", "full_attention"])
    with pytest.raises(ValueError, match=message):
        tiny_config(layer_types, **overrides)
