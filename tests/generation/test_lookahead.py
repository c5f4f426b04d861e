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
