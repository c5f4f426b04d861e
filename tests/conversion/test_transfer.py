"""Weight transfer: a converted model that keeps every layer softmax reproduces its base exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from hf_linattn.conversion import UnsupportedBaseModelError, linear_config_from_base, linearize
from hf_linattn.conversion.transfer import init_gates_from_keys

COMMON = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)  # fmt: skip


def llama():
    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    return LlamaForCausalLM(LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True, rope_parameters=rope))


def qwen2():
    return Qwen2ForCausalLM(Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=2))


def qwen3():
    return Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=True))


BASES = {"llama": llama, "qwen2": qwen2, "qwen3": qwen3}


def randomize(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # biases and norms too, so a missed copy shows
    return model.eval()


@pytest.mark.parametrize("name", list(BASES))
def test_all_softmax_conversion_reproduces_the_base(name):
    base = randomize(BASES[name]())
    layer_types = list(getattr(base.config, "layer_types", None) or ["full_attention"] * 4)
    model = linearize(base, layer_types)
    assert model.config.tie_word_embeddings == base.config.tie_word_embeddings
    ids = torch.randint(1, 101, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-4, atol=1e-4)
        kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        ref = base.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name", list(BASES))
def test_linear_layers_reuse_the_base_projections(name):
    base = randomize(BASES[name]())
    layer_types = list(getattr(base.config, "layer_types", None) or ["full_attention"] * 4)
    layer_types[0], layer_types[1] = "rdn", "gla"
    model = linearize(base, layer_types)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        torch.testing.assert_close(getattr(model.model.layers[0].self_attn, proj).weight,
                                   getattr(base.model.layers[0].self_attn, proj).weight)  # fmt: skip
    conv = model.model.layers[0].self_attn.conv1d.weight
    assert torch.equal(conv[..., -1], torch.ones_like(conv[..., -1])) and not conv[..., :-1].any()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(1, 101, (1, 70))).logits).all()


@pytest.mark.parametrize("name", ["llama", "qwen3"])  # llama here has a key bias; qwen3 a head_dim of its own
def test_gates_from_keys_pool_each_heads_keys(name):
    """Liger's gates: head h's gate pre-activation is the mean of its key head's keys (bias included)."""
    base = randomize(BASES[name]())
    model = linearize(base, ["rdn", "gdn", "full_attention", "full_attention"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert init_gates_from_keys(model) == 2
    x = torch.randn(5, 64)
    for attn in (model.model.layers[0].self_attn, model.model.layers[1].self_attn):
        heads, kv_heads, d = attn.num_heads, attn.num_kv_heads, attn.key_dim
        keys = attn.k_proj(x).view(5, kv_heads, d).mean(-1)  # [5, kv_heads]
        expected = keys.repeat_interleave(heads // kv_heads, dim=1)
        prefix = f"model.layers.{attn.layer_idx}.self_attn."
        with torch.no_grad():
            got = attn.a_proj(x) + attn.dt_bias - before[prefix + "dt_bias"]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    pieces = ("a_proj.weight", "dt_bias") if name == "llama" else ("a_proj.weight",)  # a key bias moves to dt_bias
    assert changed == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in pieces}


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedBaseModelError, match="llama, qwen2, qwen3"):
        linear_config_from_base(GPT2Config(), ["rdn"] * 12)


def test_a_softmax_entry_must_match_the_base_layer():
    with pytest.raises(ValueError, match="layer 0 is 'full_attention'"):
        linear_config_from_base(qwen2().config, ["sliding_attention", "rdn", "rdn", "rdn"])
