"""Speculative decoding and prompt lookup through ``generate()`` with hf_linattn models as target or draft.

Greedy output must equal plain greedy token for token; sampled output must follow the target's
own distribution (a chi-square test against the exact distribution, at a stated significance).
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare
from transformers import LlamaConfig, LlamaForCausalLM

from hf_linattn.generation import track_acceptance
from tests.modeling.tiny import HYBRID, STACKS, VOCAB, prompt, spread_projections, tiny_model

GREEDY = dict(do_sample=False, max_new_tokens=24, pad_token_id=0, eos_token_id=None)


def tiny_llama(seed: int, vocab: int = VOCAB, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)  # fmt: skip
    return spread_projections(LlamaForCausalLM(config).eval())


def generate(model, ids, **kwargs):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **{**GREEDY, **kwargs})


def as_draft(model, tokens: int = 4):
    """Draft ``tokens`` per round whatever the draft's confidence (tiny random models are never confident)."""
    model.generation_config.num_assistant_tokens = tokens
    model.generation_config.num_assistant_tokens_schedule = "constant"
    model.generation_config.assistant_confidence_threshold = 0.0
    return model


def close_draft(target, seed: int):
    """A draft that agrees with the target often: the target with a little noise on every weight."""
    draft = type(target)(target.config).eval()
    draft.load_state_dict(target.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.002)
    return as_draft(draft)


@pytest.mark.parametrize("draft_kind", ["linattn-close", "linattn-other", "llama"])
def test_greedy_speculative_equals_plain_greedy(stack, draft_kind):
    _, layer_types = stack
    target = tiny_model(layer_types, seed=1)
    draft = {
        "linattn-close": lambda: close_draft(target, seed=2),
        "linattn-other": lambda: as_draft(tiny_model(STACKS["gdn"], seed=3)),
        "llama": lambda: as_draft(tiny_llama(seed=4)),
    }[draft_kind]()
    rounds = []
    for seed in (50, 51, 52):
        ids = prompt(1, 12 + seed % 7, seed=seed)
        with track_acceptance(target) as stats:
            fast = generate(target, ids, assistant_model=draft)
        assert torch.equal(fast, generate(target, ids)), (draft_kind, seed)
        assert stats.rounds > 0 and all(0 <= a <= d for a, d in zip(stats.accepted, stats.drafted))
        assert max(stats.drafted) == 4
        rounds += list(zip(stats.accepted, stats.drafted))
    if draft_kind == "linattn-close":
        assert sum(a for a, _ in rounds) > 0.3 * sum(d for _, d in rounds)
        assert any(0 < a < d for a, d in rounds)  # partial blocks: both caches rolled back mid-block


def test_linattn_draft_for_a_plain_llama_target():
    target = tiny_llama(seed=5, layers=3)
    draft = as_draft(tiny_model(HYBRID, seed=6), tokens=3)
    for seed in (53, 54):
        ids = prompt(1, 10, seed=seed)
        assert torch.equal(generate(target, ids, assistant_model=draft), generate(target, ids))


def test_prompt_lookup_equals_plain_greedy(stack):
    _, layer_types = stack
    model = tiny_model(layer_types, seed=7)
    pattern = prompt(1, 6, seed=55)
    ids = torch.cat([pattern, pattern, pattern[:, :3]], 1)  # repeats, so lookups find candidates
    with track_acceptance(model) as stats:
        fast = generate(model, ids, prompt_lookup_num_tokens=4)
    assert torch.equal(fast, generate(model, ids))
    assert stats.rounds > 0


def test_batched_assisted_generation_is_refused_clearly():
    target = tiny_model(STACKS["rdn"], seed=8)
    with pytest.raises(ValueError, match="batch_size = 1"):
        generate(target, prompt(2, 8, seed=56), assistant_model=as_draft(tiny_model(STACKS["gla"], seed=9)))


# ---- sampling: the output distribution is the target's, whatever the draft ----

SMALL_VOCAB = 5
DRAWS = 1200
ALPHA = 1e-3  # significance of the goodness-of-fit test (fixed seeds: the outcome is deterministic)


def exact_two_token_distribution(model, ids) -> torch.Tensor:
    """P(x1, x2 | ids) under plain sampling, [V, V], from the model's own softmax."""
    V = model.config.vocab_size
    with torch.no_grad():
        p1 = model(ids).logits[0, -1].softmax(-1)
        rows = torch.cat([ids.expand(V, -1), torch.arange(V)[:, None]], 1)
        p2 = model(rows).logits[:, -1].softmax(-1)
    return p1[:, None] * p2


def sampled_counts(model, ids, **kwargs) -> torch.Tensor:
    counts = torch.zeros(SMALL_VOCAB, SMALL_VOCAB)
    for i in range(DRAWS):
        torch.manual_seed(10_000 + i)
        out = generate(model, ids, do_sample=True, max_new_tokens=2, top_k=0, **kwargs)[0, -2:]
        counts[out[0], out[1]] += 1
    return counts


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.flatten().double()
    return chisquare(counts.flatten().double().numpy(), (expected / expected.sum() * counts.sum()).numpy()).pvalue


def small_vocab_model(layer_types: list[str], seed: int):
    model = tiny_model(layer_types, seed=seed, vocab_size=SMALL_VOCAB, pad_token_id=None, bos_token_id=None,
                       eos_token_id=None)  # fmt: skip
    with torch.no_grad():
        model.model.norm.weight.mul_(6.0)  # sharper next-token distributions than a random init gives
    return model


def test_speculative_sampling_follows_the_target_distribution():
    target = small_vocab_model(STACKS["rdn"], seed=10)
    draft = as_draft(small_vocab_model(["gla"], seed=11), tokens=2)
    ids = torch.tensor([[1, 3, 0, 4, 2, 2]])
    exact = exact_two_token_distribution(target, ids)
    draft_exact = exact_two_token_distribution(draft, ids)
    assert min(exact.flatten().tolist()) * DRAWS > 1  # every cell expects a count: the test is valid
    # the draft's own distribution is far from the target's, so a biased sampler would show
    assert (exact - draft_exact).abs().sum() > 0.3
    speculative = sampled_counts(target, ids, assistant_model=draft)
    assert chi_square_p(speculative, exact) > ALPHA
    # the test has power: the same counts reject the draft's distribution, which a biased sampler would drift to
    assert chi_square_p(speculative, draft_exact) < ALPHA


def test_embedded_teacher_with_its_draft_and_with_a_converted_student():
    """The shipped models: the draft, and a linearized copy of the teacher, each drafting for the teacher."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_linattn.assets import DRAFT_DIR, TEACHER_DIR
    from hf_linattn.conversion import linearize

    tok = AutoTokenizer.from_pretrained(TEACHER_DIR)
    teacher = AutoModelForCausalLM.from_pretrained(TEACHER_DIR, dtype=torch.float32).eval()
    student = as_draft(linearize(teacher, ["rdn"] * 6 + ["full_attention"] * 2))
    draft = as_draft(AutoModelForCausalLM.from_pretrained(DRAFT_DIR, dtype=torch.float32).eval())
    ids = tok("import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n", return_tensors="pt").input_ids
    plain = generate(teacher, ids)
    for drafter in (draft, student):
        with track_acceptance(teacher) as stats:
            assert torch.equal(generate(teacher, ids, assistant_model=drafter), plain)
        assert stats.rounds > 0
