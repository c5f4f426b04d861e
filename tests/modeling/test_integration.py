"""Conventions of an in-tree transformers model: attention backends, outputs, rotary, cache protocol, layers.

Each test goes through the public entry points (the model's forward, ``generate()``) on the installed
transformers (CI runs them on the newest release and on the oldest supported one).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from hf_linattn import LinAttnCache
from hf_linattn.modeling.layers_linattn import LinAttnRotaryEmbedding, apply_rotary

from .tiny import HYBRID, STACKS, prompt, tiny_config, tiny_model

GREEDY = dict(do_sample=False, pad_token_id=0, eos_token_id=None)


def test_decoder_layers_are_gradient_checkpointing_layers():
    model = tiny_model(HYBRID)
    assert all(isinstance(layer, GradientCheckpointingLayer) for layer in model.model.layers)


def manual_attention_weights(model, hidden: torch.Tensor, layer_idx: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal (sliding) mask) of one softmax layer, from its input hidden states."""
    layer = model.model.layers[layer_idx]
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, attn.num_heads, attn.head_dim)
    k = attn.k_proj(x).view(B, T, attn.num_kv_heads, attn.head_dim)
    positions = torch.arange(T)[None]
    cos, sin = model.model.rotary_emb(x, positions)
    q, k = apply_rotary(q, cos, sin).transpose(1, 2), apply_rotary(k, cos, sin).transpose(1, 2)
    k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
    scores = q @ k.transpose(-1, -2) / attn.head_dim**0.5
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    allowed = j <= i
    if attn.sliding_window is not None:
        allowed &= j > i - attn.sliding_window
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


def test_eager_attention_weights_equal_a_manual_softmax():
    model = tiny_model(HYBRID, attn_implementation="eager")
    ids = prompt(2, 12, seed=60)
    with torch.no_grad():
        out = model(ids, output_attentions=True, output_hidden_states=True)
        softmax_layers = [i for i, t in enumerate(HYBRID) if t.endswith("attention")]
        assert len(out.attentions) == len(softmax_layers) == 2  # one entry per softmax layer, as Qwen3-Next
        for weights, i in zip(out.attentions, softmax_layers):
            want = manual_attention_weights(model, out.hidden_states[i], i)
            torch.testing.assert_close(weights, want, rtol=1e-5, atol=1e-6)
    assert (out.attentions[0][..., 0, 1:] == 0).all()  # causal
    assert (out.attentions[0][..., 11, :7] == 0).all()  # layer 1 slides over 5 keys


@pytest.mark.parametrize("implementation", ["sdpa", "flex_attention"])
def test_attention_backends_give_the_eager_logits(implementation):
    model = tiny_model(HYBRID, seed=3)
    ids = prompt(2, 14, seed=61)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding in one row
    with torch.no_grad():
        model.set_attn_implementation("eager")
        want = model(ids, attention_mask=mask).logits
        model.set_attn_implementation(implementation)
        got = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-4, atol=1e-5)


def test_outputs_follow_the_config():
    model = tiny_model(HYBRID, attn_implementation="eager", output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        out = model(prompt(1, 9, seed=62))
        assert len(out.hidden_states) == len(HYBRID) + 1
        assert len(out.attentions) == 2
        quiet = model(prompt(1, 9, seed=62), output_hidden_states=False, output_attentions=False)
    assert quiet.hidden_states is None and quiet.attentions is None


def test_a_stack_without_softmax_layers_has_no_attention_weights():
    """One None per layer (as models whose attention backend returns no weights), through generate() too."""
    model = tiny_model(STACKS["rdn"], attn_implementation="eager")
    draft = tiny_model(STACKS["gla"], seed=4)
    ids = prompt(1, 5, seed=63)
    with torch.no_grad():
        assert model(ids, output_attentions=True).attentions == (None, None)
        out = model.generate(ids, assistant_model=draft, max_new_tokens=4, output_attentions=True,
                             return_dict_in_generate=True, **GREEDY)  # fmt: skip
    assert torch.equal(out.sequences, model.generate(ids, max_new_tokens=4, **GREEDY))


def test_output_attentions_and_hidden_states_through_assisted_decoding():
    target = tiny_model(HYBRID, seed=1, attn_implementation="eager")
    draft = tiny_model(STACKS["gdn"], seed=2)
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    ids = prompt(1, 10, seed=64)
    with torch.no_grad():
        out = target.generate(ids, assistant_model=draft, max_new_tokens=8, output_attentions=True,
                              output_hidden_states=True, return_dict_in_generate=True, **GREEDY)  # fmt: skip
        plain = target.generate(ids, max_new_tokens=8, output_attentions=True, output_hidden_states=True,
                                return_dict_in_generate=True, **GREEDY)  # fmt: skip
    assert torch.equal(out.sequences, plain.sequences)
    assert len(out.attentions) == len(plain.attentions) == 8  # one entry per generated token
    for got, want in zip(out.attentions, plain.attentions):
        assert len(got) == 2
        for a, b in zip(got, want):
            # a verify forward shows a sliding layer the block's later keys too: they get weight 0
            n = b.shape[-1]
            torch.testing.assert_close(a[..., :n], b, rtol=1e-4, atol=1e-5)
            assert (a[..., n:] == 0).all()
    assert len(out.hidden_states) == 8 and len(out.hidden_states[0]) == len(HYBRID) + 1


ROPE_CASES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                 "long_factor": [2.0 + 0.3 * i for i in range(8)], "original_max_position_embeddings": 16},
}  # fmt: skip


@pytest.mark.parametrize("rope", list(ROPE_CASES))
def test_rotary_matches_llama_beyond_the_original_length(rope):
    """cos/sin of every rope type equal LlamaRotaryEmbedding's, including the dynamic updates with length."""
    params = {"rope_theta": 10000.0, **ROPE_CASES[rope]}
    ours = LinAttnRotaryEmbedding(tiny_config(["full_attention"], hidden_size=64, num_attention_heads=4,
                                              max_position_embeddings=16, rope_parameters=dict(params)))  # fmt: skip
    llama = LlamaRotaryEmbedding(LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=16,
                                             rope_parameters=dict(params)))  # fmt: skip
    x = torch.zeros(1, dtype=torch.float32)
    for length in (64, 8, 40, 12):  # beyond, back within (dynamic resets), beyond again
        positions = torch.arange(length)[None]
        for got, want in zip(ours(x, positions), llama(x, positions)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_dynamic_rope_grows_with_the_sequence():
    params = {"rope_theta": 10000.0, "rope_type": "dynamic", "factor": 4.0}
    rotary = LinAttnRotaryEmbedding(tiny_config(["full_attention"], max_position_embeddings=16, rope_parameters=params))
    x = torch.zeros(1)
    short = rotary(x, torch.arange(8)[None])[0][0, 7]
    long = rotary(x, torch.arange(64)[None])[0][0, 7]
    assert not torch.allclose(short, long)  # the frequencies were rescaled for 64 positions


def test_the_cache_speaks_transformers_protocol():
    from hf_linattn.modeling.modeling_linattn import OUTPUT_CACHE_FIELD

    model = tiny_model(HYBRID)
    with torch.no_grad():
        cache = getattr(model(prompt(1, 7, seed=65), use_cache=True), OUTPUT_CACHE_FIELD)
    assert isinstance(cache, LinAttnCache)
    assert cache.is_linear == [t in ("gla", "gdn", "rla", "rdn") for t in HYBRID]
    assert cache.is_sliding == [t == "sliding_attention" for t in HYBRID]
    assert cache.is_croppable and not cache.is_compileable
    assert cache.get_seq_length() == 7 and len(cache) == len(HYBRID)


@pytest.mark.parametrize("name", ["hybrid", "gla"])
def test_generate_continues_from_a_returned_cache_with_the_current_argument_name(name):
    """``generate(seq, cache=out.cache)`` (``past_key_values`` before transformers 5.24), for a hybrid and for a
    stack whose layers are all linear (which transformers >= 5.24 does not slice to the new tokens itself)."""
    from hf_linattn.modeling.modeling_linattn import GENERATE_CACHE_KWARG, OUTPUT_CACHE_FIELD

    model = tiny_model(STACKS[name])
    ids = prompt(1, 12, seed=38)
    with torch.no_grad():
        full = model.generate(ids, max_new_tokens=10, **GREEDY)
        first = model.generate(ids, max_new_tokens=5, return_dict_in_generate=True, **GREEDY)
        cache = getattr(first, OUTPUT_CACHE_FIELD)
        assert isinstance(cache, LinAttnCache) and cache.get_seq_length() == 12 + 4
        second = model.generate(first.sequences, max_new_tokens=5, **{GENERATE_CACHE_KWARG: cache}, **GREEDY)
    assert torch.equal(second, full)


def test_both_cache_argument_names_work_and_conflicts_are_refused():
    model = tiny_model(HYBRID)
    ids = prompt(1, 9, seed=66)
    with torch.no_grad():
        a, b = LinAttnCache(model.config), LinAttnCache(model.config)
        model(ids[:, :5], cache=a)
        model(ids[:, :5], past_key_values=b)
        torch.testing.assert_close(model(ids[:, 5:], cache=a).logits, model(ids[:, 5:], past_key_values=b).logits)
        with pytest.raises(ValueError, match="pass the cache once"):
            model(ids[:, 5:], cache=a, past_key_values=b)


@pytest.mark.parametrize("name", list(STACKS))
def test_static_cache_generation_equals_the_dynamic_cache(name):
    model = tiny_model(STACKS[name])
    ids = prompt(2, 11, seed=67)
    with torch.no_grad():
        dynamic = model.generate(ids, max_new_tokens=9, **GREEDY)
        static = model.generate(ids, max_new_tokens=9, cache_implementation="static", **GREEDY)
    assert torch.equal(static, dynamic)


def test_compiled_static_decode_step_equals_eager():
    """A decode step traces as one graph (fullgraph) over the static cache and computes the same logits."""
    from hf_linattn.modeling import LinAttnStaticCache

    model = tiny_model(HYBRID)
    ids = prompt(1, 10, seed=68)
    with torch.no_grad():
        caches = [LinAttnStaticCache(model.config, max_cache_len=16) for _ in range(2)]
        for cache in caches:
            model(ids, cache=cache)
        step = torch.compile(model.forward, fullgraph=True, backend="eager")
        nxt = prompt(1, 1, seed=69)
        for _ in range(3):
            positions = torch.full((1, 1), int(caches[0].get_seq_length()))
            want = model(nxt, cache=caches[0], position_ids=positions).logits
            got = step(input_ids=nxt, cache=caches[1], position_ids=positions).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            nxt = want[:, -1:].argmax(-1)
    assert caches[1].is_compileable


@pytest.mark.parametrize("name", list(STACKS))
def test_packed_rows_equal_separate_sequences(name):
    """Padding-free batches: sequences packed in one row (position ids restarting at 0) give each sequence's
    own logits and gradients, as if run alone: states reset at every start."""
    lengths = [7, 13, 5]
    model = tiny_model(STACKS[name]).double().train()
    model.config.attention_dropout = 0.0
    seqs = [prompt(1, n, seed=70 + i) for i, n in enumerate(lengths)]
    packed = torch.cat(seqs, 1)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    out = model(packed, position_ids=positions).logits
    alone = torch.cat([model(s).logits for s in seqs], 1)
    torch.testing.assert_close(out, alone, rtol=1e-9, atol=1e-10)
    grad_packed = torch.autograd.grad(out.square().sum(), list(model.parameters()), allow_unused=True)
    grad_alone = torch.autograd.grad(alone.square().sum(), list(model.parameters()), allow_unused=True)
    for a, b in zip(grad_packed, grad_alone):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
