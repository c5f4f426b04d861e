"""Lookahead decoding: greedy output identical to plain greedy, for our models and plain transformers LMs."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from hf_linattn.generation import CUSTOM_GENERATE_DIR, LookaheadStats, lookahead_decoding, lookahead_generate
from tests.modeling.tiny import STACKS, VOCAB, prompt, spread_projections, tiny_model

from .test_speculative import generate, tiny_llama


def tiny_qwen2(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)  # fmt: skip
    return spread_projections(Qwen2ForCausalLM(config).eval())


MODELS = {
    **{name: (lambda name=name: tiny_model(STACKS[name], seed=1)) for name in STACKS},
    "llama": lambda: tiny_llama(seed=4),
    "qwen2": lambda: tiny_qwen2(seed=5),
}


def repetitive(seed: int) -> torch.Tensor:
    pattern = prompt(1, 5, seed=seed)
    return torch.cat([pattern, pattern, pattern, pattern[:, :2]], 1)


@pytest.mark.parametrize("name", list(MODELS))
def test_lookahead_equals_plain_greedy(name):
    model = MODELS[name]()
    stats = LookaheadStats()
    for seed, (window, ngram, guesses) in zip((60, 61, 62), [(5, 3, 4), (7, 5, 7), (3, 2, 2)]):
        ids = repetitive(seed) if seed != 62 else prompt(1, 9, seed=seed)
        out = lookahead_generate(model, ids, max_new_tokens=30, window=window, ngram=ngram, guesses=guesses,
                                 stats=stats)  # fmt: skip
        assert torch.equal(out, generate(model, ids, max_new_tokens=30)), (name, seed)
    assert sum(stats.committed) >= 90  # the last step may commit past the limit; the output is cut
    # multi-token steps happened, so verified guesses and cropped rollbacks were exercised
    assert max(stats.committed) > 1, stats


def test_stops_at_eos_like_generate():
    model = tiny_model(STACKS["hybrid"], seed=1)
    ids = repetitive(63)
    plain = generate(model, ids, max_new_tokens=30)[0, ids.shape[1] :]
    eos = int(plain[7])  # a token the greedy continuation reaches
    expected = generate(model, ids, max_new_tokens=30, eos_token_id=eos)
    got = lookahead_generate(model, ids, max_new_tokens=30, eos_token_id=eos)
    assert torch.equal(got, expected)
    assert int(got[0, -1]) == eos


@pytest.mark.parametrize("form", ["callable", "folder"])
def test_custom_generate_entry_points(form):
    model = tiny_model(STACKS["rdn"], seed=2)
    ids = repetitive(64)
    custom = lookahead_decoding if form == "callable" else str(CUSTOM_GENERATE_DIR)
    extra = {} if form == "callable" else {"trust_remote_code": True}
    out = generate(model, ids, max_new_tokens=25, custom_generate=custom, lookahead_window=4, **extra)
    assert torch.equal(out, generate(model, ids, max_new_tokens=25))


def test_sampling_is_refused():
    model = tiny_model(STACKS["gla"], seed=3)
    with pytest.raises(ValueError, match="greedy"):
        generate(model, prompt(1, 6, seed=65), do_sample=True, custom_generate=lookahead_decoding)


def test_custom_generate_folder_runs_without_the_package(tmp_path):
    """A plain Llama, in a process where hf_linattn cannot be imported, decodes through the shipped folder."""
    import subprocess
    import sys
    import textwrap

    tiny_llama(seed=4).save_pretrained(tmp_path / "llama")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_linattn"] = None
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "llama")!r}).eval()
        pattern = torch.tensor([[5, 9, 14, 3, 22]])
        ids = torch.cat([pattern, pattern, pattern], 1)
        kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
        plain = model.generate(ids, **kw)
        fast = model.generate(ids, custom_generate={str(CUSTOM_GENERATE_DIR)!r}, trust_remote_code=True, **kw)
        assert torch.equal(plain, fast), (plain, fast)
        print("identical")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "identical" in result.stdout


# ---- lengths: generate()'s rules, through every entry point ----

FOLDER = dict(custom_generate=str(CUSTOM_GENERATE_DIR), trust_remote_code=True)


def plain_generate(model, ids, **kwargs):
    """generate() without the test defaults, so that the length arguments are exactly the ones given."""
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                              eos_token_id=None, **kwargs)  # fmt: skip


@pytest.mark.parametrize("bad", [-3, 0])
def test_non_positive_max_new_tokens_is_refused_everywhere(bad):
    model = tiny_model(STACKS["rdn"], seed=2)
    ids = repetitive(66)
    with pytest.raises(ValueError, match="max_new_tokens` must be greater than 0"):
        lookahead_generate(model, ids, max_new_tokens=bad)
    with pytest.raises(ValueError, match="max_new_tokens` must be greater than 0"):
        plain_generate(model, ids, max_new_tokens=bad, **FOLDER)
    with pytest.raises(ValueError, match="max_new_tokens"):  # the callable form: generate() itself refuses
        plain_generate(model, ids, max_new_tokens=bad, custom_generate=lookahead_decoding)


@pytest.mark.parametrize("form", ["callable", "folder"])
def test_max_length_is_honoured_and_max_new_tokens_wins(form):
    model = tiny_model(STACKS["hybrid"], seed=2)
    ids = repetitive(67)
    custom = {"custom_generate": lookahead_decoding} if form == "callable" else FOLDER
    # 9 new tokens; 6 (max_new_tokens wins); 20 (generate()'s default)
    cases = [(dict(max_length=ids.shape[1] + 9), 9), (dict(max_new_tokens=6, max_length=ids.shape[1] + 9), 6), ({}, 20)]
    for lengths, new in cases:
        got = plain_generate(model, ids, **lengths, **custom)
        assert got.shape[1] == ids.shape[1] + new and torch.equal(got, plain_generate(model, ids, **lengths)), lengths


def test_folder_refuses_a_max_length_within_the_prompt_and_min_new_tokens_with_eos():
    model = tiny_model(STACKS["gla"], seed=2)
    ids = repetitive(68)
    with pytest.raises(ValueError, match="max_length"):
        plain_generate(model, ids, max_length=ids.shape[1], **FOLDER)
    with pytest.raises(ValueError, match="min_new_tokens"), torch.no_grad():
        model.generate(ids, min_new_tokens=4, max_new_tokens=8, eos_token_id=2, **FOLDER)


def test_rows_of_transformers_kv_layers_are_views_not_copies():
    """One lookahead step expands the committed cache to one row per chain: transformers' dynamic key/value
    layers broadcast (no per-row copy of the context), other layers use their own batch methods."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    from hf_linattn.generation.custom_generate.generate import _repeat_rows, _select_row

    model = tiny_llama(seed=4)
    ids = repetitive(69)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    assert isinstance(cache, DynamicCache)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    _repeat_rows(cache, 5)
    for layer, (keys, _) in zip(cache.layers, before):
        assert layer.keys.shape[0] == 5 and layer.keys.stride(0) == 0 and torch.equal(layer.keys[3], keys[0])
    _select_row(cache, 3, ids.device)
    assert all(
        torch.equal(layer.keys, k) and torch.equal(layer.values, v) for layer, (k, v) in zip(cache.layers, before)
    )

    linattn = tiny_model(STACKS["hybrid"], seed=1)
    with torch.no_grad():
        out = linattn(ids, use_cache=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    _repeat_rows(cache, 3)
    kv = [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]
    assert len(kv) == 2 and all(layer.keys.shape[0] == 3 for layer in kv)
    # transformers' own layer (exact type) broadcasts; a subclass (hf_linattn's sliding layer) uses its own method
    assert [type(layer) is DynamicLayer and layer.keys.stride(0) == 0 for layer in kv] == [False, True]
    assert all(layer.state[0].shape[0] == 3 for layer in cache.layers if getattr(layer, "state", None) is not None)
