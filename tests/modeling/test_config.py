"""LinAttnConfig: defaults, Auto registration, and one clear error per invalid value."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedConfig

from hf_linattn import LinAttnConfig, LinAttnForCausalLM, LinAttnModel

from .tiny import tiny_config

# transformers' strict config dataclass wraps validator errors (and reports wrongly typed fields) in its own class
CONFIG_ERRORS = (ValueError, TypeError, StrictDataclassError)


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
    assert again.mixer_types == config.mixer_types == ["gla", "sliding_attention"]
    assert again.layer_types == config.layer_types == ["linear_attention", "sliding_attention"]
    assert again.linear_value_head_dim == 12 and again.linear_use_rotary


def test_layer_types_are_in_transformers_vocabulary(tmp_path):
    """config.json's layer_types pass transformers' own validation (what AutoTokenizer falls back to without
    trust_remote_code); the modes live in mixer_types."""
    tiny_config(["rdn", "sliding_attention", "full_attention"]).save_pretrained(tmp_path)
    generic = PreTrainedConfig.from_pretrained(tmp_path)
    assert generic.layer_types == ["linear_attention", "sliding_attention", "full_attention"]
    assert generic.mixer_types == ["rdn", "sliding_attention", "full_attention"]


def test_older_checkpoints_with_modes_in_layer_types_still_load():
    fields = tiny_config(["gdn", "full_attention"]).to_dict()
    fields.pop("mixer_types")
    fields["layer_types"] = ["gdn", "full_attention"]  # as hf_linattn 0.1 saved it
    config = LinAttnConfig.from_dict(fields)
    assert config.mixer_types == ["gdn", "full_attention"]
    assert config.layer_types == ["linear_attention", "full_attention"]


def test_transformers_validators_see_our_hook():
    assert "validate_layer_type" in [v.__name__ for v in LinAttnConfig.__class_validators__]
    assert LinAttnConfig.validate_layer_type is not PreTrainedConfig.validate_layer_type


def test_auto_classes_are_registered():
    fields = {k: v for k, v in tiny_config(["rdn"]).to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("hf_linattn", **fields)
    assert isinstance(config, LinAttnConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), LinAttnForCausalLM)
    assert isinstance(AutoModel.from_config(config), LinAttnModel)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"layer_types": ["rdn", "mamba"]}, r"mixer_types\[1\] = 'mamba' is not a known layer type"),
        ({"layer_types": ["rdn"], "num_hidden_layers": 3}, "must equal the number of layers"),
        ({"layer_types": []}, "at least one layer"),
        ({"layer_types": "rdn"}, "layer_types"),  # a string, not a list: never split into letters
        ({"layer_types": ["linear_attention"]}, "no mixer_types to say which mode"),
        ({"layer_types": ["sliding_attention"], "mixer_types": ["rdn"]}, "does not match mixer_types"),
        ({"residual_clip": "1"}, "residual_clip"),
        ({"rms_norm_eps": -1.0}, "rms_norm_eps must be > 0"),
        ({"rope_parameters": {"rope_type": "spiral", "rope_theta": 1e4}}, "'spiral' is not known"),
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
    with pytest.raises(CONFIG_ERRORS, match=message):
        tiny_config(layer_types, **overrides)


def test_integer_values_of_float_fields_are_accepted():
    config = tiny_config(["rdn"], residual_clip=1, rms_norm_eps=1)
    assert config.residual_clip == 1 and config.rms_norm_eps == 1
    assert torch.isfinite(LinAttnForCausalLM(config)(torch.tensor([[3, 4]])).logits).all()
