"""Adaptive draft length (``num_assistant_tokens_schedule="adaptive"``): exact, adapts K, respects max_length.

The schedule times real rounds, so the adaptation tests build pairs whose right answer does not
hang on timing noise: a draft that computes exactly the target's function at a sixth of its cost
(every drafted token is accepted) and an unrelated draft (almost none is).
"""

from __future__ import annotations

import pytest
import torch

from hf_linattn.generation import DraftLengthPolicy, draft_length_policy, track_acceptance
from hf_linattn.generation.adaptive import CostCurve, best_draft_length, expected_committed_tokens
from tests.modeling.tiny import STACKS, prompt, tiny_model

from .test_speculative import tiny_llama


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the policy times real rounds, and on a loaded 2-core machine two threads per tiny op
    spend most of their time waiting for each other (tiny models do not gain from threads anyway)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def line(intercept: float, slope: float) -> CostCurve:
    cost = CostCurve()
    for k in (1, 2, 3, 4):
        cost.add(k, intercept + slope * k)
    return cost


def test_cost_curve_fit_ignores_a_slow_outlier_and_expected_tokens():
    cost = line(2.0, 0.5)
    assert cost.intercept == pytest.approx(2.0) and cost.slope == pytest.approx(0.5)
    cost.add(3, 50.0)  # one round hit by a neighbour's burst
    assert cost(3) == pytest.approx(3.5) and cost(10) == pytest.approx(7.0)
    for a, k in ((0.3, 0), (0.7, 3), (0.95, 10)):
        assert expected_committed_tokens(a, k) == pytest.approx((1 - a ** (k + 1)) / (1 - a))
    assert expected_committed_tokens(1.0, 5) == 6


def test_best_length_follows_acceptance_and_cost():
    verify = line(1.0, 0.05)  # a verify forward: nearly flat in K
    cheap, costly = line(0.02, 0.02), line(0.1, 0.8)  # draft per token: 2 % / 80 % of a target step
    lengths = [best_draft_length(a, cheap, verify, max_length=16) for a in (0.2, 0.5, 0.8, 0.95)]
    assert lengths == sorted(lengths) and lengths[0] <= 1 and lengths[-1] >= 10  # K grows with acceptance
    assert best_draft_length(0.8, costly, verify, 16) < best_draft_length(0.8, cheap, verify, 16)
    assert best_draft_length(0.3, costly, verify, 16) == 0  # the draft does not pay: plain target steps
    assert best_draft_length(0.99, cheap, verify, max_length=3) == 3  # never past the cap


def test_policy_calibrates_then_probes_when_idle():
    policy = DraftLengthPolicy(max_tokens=8, probe_every=3)
    # two different K, alternating until each has two timings (the first round is a prefill: untimed)
    assert [policy.next_length(budget=100) for _ in range(3)] == [4, 1, 4]
    for k in (1, 4, 1, 4):
        policy.draft_cost.add(k, 0.9 * k)  # a draft as slow as the target
        policy.verify_cost.add(k, 1.0 + 0.1 * k)
    policy.observe_acceptance(drafted=4, accepted=0)
    # the draft does not pay: plain steps, and after 3 of them a probe of two rounds at one calibration length,
    # then at the other after twice as many plain steps
    assert [policy.next_length(budget=100) for _ in range(13)] == [0, 0, 1, 1, 0, 0, 0, 0, 0, 4, 4, 0, 0]
    assert policy.next_length(budget=0) == 0


def padded_pair(make, block: int, copies: int, seed: int, noise: float = 0.0):
    """(target, draft) from ``make(layers, seed)``: a target of ``copies * block`` layers whose layers after the
    first ``block`` add exactly 0 (output projections zeroed), and a ``block``-layer draft with the target's weights
    plus ``noise`` on each: with no noise the draft predicts every target token bit for bit, at ~1/copies the cost."""
    target, draft = make(block * copies, seed), make(block, seed + 100)
    with torch.no_grad():
        for layer in target.model.layers[block:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    first = tuple(f"model.layers.{i}." for i in range(block))
    own = {k: v for k, v in target.state_dict().items() if not k.startswith("model.layers.") or k.startswith(first)}
    draft.load_state_dict(own)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise)
    for model in (target, draft):
        # no pad id: transformers masks a generated pad token in the draft's later rounds (lower acceptance)
        model.config.pad_token_id = model.generation_config.pad_token_id = None
    return target, draft


def linattn(layer_types: list[str]):
    return lambda layers, seed: tiny_model((layer_types * layers)[:layers], seed=seed)


def llama(layers: int, seed: int):
    return tiny_llama(seed=seed, layers=layers)


def generate(model, ids, **kwargs):
    """Plain greedy (or what ``kwargs`` add) through generate(), without a pad token (see ``padded_pair``)."""
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, **kwargs)


def adaptive(model, ids, draft, schedule: str = "adaptive_transient", **kwargs):
    with track_acceptance(model) as stats:
        out = generate(model, ids, assistant_model=draft, num_assistant_tokens_schedule=schedule, **kwargs)
    return out, stats


def test_adaptive_greedy_equals_plain_greedy(stack):
    _, layer_types = stack
    target, draft = padded_pair(linattn(layer_types), len(layer_types), copies=2, seed=1, noise=0.002)
    draft.generation_config.num_assistant_tokens = 8
    rounds = []
    for seed in (70, 71):
        ids = prompt(1, 10 + seed % 5, seed=seed)
        out, stats = adaptive(target, ids, draft, max_new_tokens=24)
        assert torch.equal(out, generate(target, ids, max_new_tokens=24)), seed
        policy = draft_length_policy(target, draft, "adaptive_transient")
        assert policy.history[:2] == [4, 1]  # transient: every call calibrates afresh
        assert len(policy.history) == stats.rounds
        length = ids.shape[1]
        for drafted, accepted, chosen in zip(stats.drafted, stats.accepted, policy.history):
            assert drafted <= min(chosen, ids.shape[1] + 24 - length - 1)  # fewer if the draft emits eos
            length += accepted + 1
        rounds += list(zip(stats.accepted, stats.drafted))
    assert any(0 < a < d for a, d in rounds)  # partial blocks: both caches rolled back mid-block


def test_confidence_stop_is_off_unless_set_on_the_draft():
    target, draft = padded_pair(linattn(["rdn"]), 1, copies=4, seed=2, noise=0.05)
    draft.generation_config.eos_token_id = None  # so that only the length or the confidence stops a draft
    ids = prompt(1, 9, seed=76)

    def shortfalls() -> list[int]:
        out, stats = adaptive(target, ids, draft, max_new_tokens=30)
        assert torch.equal(out, generate(target, ids, max_new_tokens=30))
        length, short = ids.shape[1], []
        chosen_lengths = draft_length_policy(target, draft, "adaptive_transient").history
        for drafted, accepted, chosen in zip(stats.drafted, stats.accepted, chosen_lengths):
            short.append(min(chosen, ids.shape[1] + 30 - length - 1) - drafted)
            length += accepted + 1
        return short

    assert set(shortfalls()) == {0}  # transformers' default threshold (0.4) would cut these unconfident drafts
    draft.generation_config.assistant_confidence_threshold = 0.9
    assert max(shortfalls()) > 0


def test_adaptive_with_a_plain_llama_target_and_the_schedule_on_the_draft():
    target, draft = tiny_llama(seed=5, layers=3), tiny_model(STACKS["rdn"], seed=6)
    draft.generation_config.num_assistant_tokens_schedule = "adaptive"
    ids = prompt(1, 12, seed=72)
    with track_acceptance(target) as stats:
        out = generate(target, ids, assistant_model=draft, max_new_tokens=24)
    assert torch.equal(out, generate(target, ids, max_new_tokens=24))
    assert stats.rounds > 0 and draft_length_policy(target, draft).history[:2] == [4, 1]


class VirtualClock:
    """Stands in for the ``time`` module of hf_linattn.generation.adaptive: each forward of a costed model
    advances it by a fixed cost, so a policy decision tested on it does not depend on the machine's load."""

    def __init__(self) -> None:
        self.now = 0.0

    def thread_time(self) -> float:
        return self.now

    perf_counter = thread_time

    def cost(self, monkeypatch, model, per_call: float, per_token: float) -> None:
        forward = model.forward

        def timed(*args, **kwargs):
            ids = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]
            self.now += per_call + per_token * ids.shape[-1]
            return forward(*args, **kwargs)

        monkeypatch.setattr(model, "forward", timed)


def test_high_acceptance_and_a_cheap_draft_draft_long(monkeypatch):
    import hf_linattn.generation.adaptive as adaptive_module

    # the draft is the target's function at a sixth of its cost per forward, and the target's verify forward
    # costs nearly the same for 1 or 12 tokens: drafting as long as allowed (12) is the cheapest per token
    target, draft = padded_pair(llama, 1, copies=6, seed=3)
    clock = VirtualClock()
    monkeypatch.setattr(adaptive_module, "time", clock)
    clock.cost(monkeypatch, target, per_call=6.0, per_token=0.05)
    clock.cost(monkeypatch, draft, per_call=1.0, per_token=0.01)
    draft.generation_config.num_assistant_tokens = 12
    ids = prompt(1, 8, seed=73)
    out, stats = adaptive(target, ids, draft, schedule="adaptive", max_new_tokens=120)
    assert torch.equal(out, generate(target, ids, max_new_tokens=120))
    assert sum(stats.accepted) == sum(stats.drafted)  # the draft is the target's function
    policy = draft_length_policy(target, draft)
    assert policy.acceptance > 0.9
    late = policy.history[5:-3]  # after calibration (4, 1, 4, 1, 4), before the max_length cap
    # mostly longer than the calibration lengths, and near the cap (12) once the acceptance estimate is high
    median = sorted(late)[len(late) // 2]
    assert late and median >= 8 and max(late) >= 10, (policy.history, policy.draft_cost, policy.verify_cost)


def test_low_acceptance_drafts_short():
    target = tiny_model(STACKS["rdn"] * 2, seed=7)
    draft = tiny_model(["gla"], seed=8)  # unrelated weights: its tokens are almost never the target's
    draft.generation_config.num_assistant_tokens = 12
    ids = prompt(1, 8, seed=74)
    out, stats = adaptive(target, ids, draft, schedule="adaptive", max_new_tokens=80)
    assert torch.equal(out, generate(target, ids, max_new_tokens=80))
    policy = draft_length_policy(target, draft)
    assert sum(stats.accepted) <= 0.2 * sum(stats.drafted) and policy.acceptance < 0.35
    late = policy.history[5:]
    assert late and sum(late) / len(late) <= 0.8, policy.history  # mostly plain steps, and probes
    # the next call starts from what was learned (K = 0), yet its first round drafts: the draft must see the prompt
    start = len(policy.history)
    out, stats = adaptive(target, ids, draft, schedule="adaptive", max_new_tokens=20)
    assert torch.equal(out, generate(target, ids, max_new_tokens=20))
    assert stats.drafted[0] == 1 and 0 in policy.history[start + 1 :]


def test_never_drafts_past_max_length_and_keeps_what_it_learned():
    target, draft = padded_pair(linattn(["gla"]), 1, copies=6, seed=9)
    draft.generation_config.num_assistant_tokens = 20
    ids = prompt(1, 8, seed=75)
    adaptive(target, ids, draft, schedule="adaptive", max_new_tokens=60)  # learns: draft as long as allowed
    policy = draft_length_policy(target, draft)
    learned = len(policy.history)
    for new_tokens in (7, 3, 1):
        out, stats = adaptive(target, ids, draft, schedule="adaptive", max_new_tokens=new_tokens)
        assert out.shape[1] == ids.shape[1] + new_tokens
        assert torch.equal(out, generate(target, ids, max_new_tokens=new_tokens))
        length = ids.shape[1]
        for drafted, accepted in zip(stats.drafted, stats.accepted):
            assert drafted <= ids.shape[1] + new_tokens - length - 1  # transformers' cap: room for the bonus token
            length += accepted + 1
    assert draft_length_policy(target, draft) is policy and len(policy.history) > learned  # "adaptive" persists
    assert stats.drafted == [0]  # a single new token: nothing to draft
    # a transient call in between neither resets nor replaces what "adaptive" learned
    adaptive(target, ids, draft, schedule="adaptive_transient", max_new_tokens=10)
    assert draft_length_policy(target, draft) is policy and draft_length_policy(target, draft, "adaptive_transient")
    assert draft_length_policy(target, draft, "adaptive_transient") is not policy


def test_adaptive_speculative_sampling_follows_the_target_distribution():
    """Sampling stays exact with the length chosen per round, including K = 0 rounds (plain sampling steps)."""
    from .test_speculative import ALPHA, chi_square_p, exact_two_token_distribution, sampled_counts, small_vocab_model

    target = small_vocab_model(STACKS["rdn"], seed=10)
    draft = small_vocab_model(["gla"], seed=11)
    draft.generation_config.num_assistant_tokens_schedule = "adaptive"
    ids = torch.tensor([[1, 3, 0, 4, 2, 2]])
    exact = exact_two_token_distribution(target, ids)
    with track_acceptance(target) as stats:
        counts = sampled_counts(target, ids, assistant_model=draft)
    assert 0 in stats.drafted and 1 in stats.drafted  # both a drafted token and a plain step were sampled
    assert chi_square_p(counts, exact) > ALPHA
    assert chi_square_p(counts, exact_two_token_distribution(draft, ids)) < ALPHA  # the test has power


def test_track_acceptance_nests_inside_another_wrapper():
    """track_acceptance restores what was on the instance before it (here: another wrapper), not the class method."""
    target, draft = padded_pair(linattn(["gla"]), 1, copies=2, seed=12)
    calls = []
    make = target._get_candidate_generator

    def outer(*args, **kwargs):
        calls.append(1)
        return make(*args, **kwargs)

    target._get_candidate_generator = outer
    ids = prompt(1, 8, seed=77)
    with track_acceptance(target) as stats:
        generate(target, ids, assistant_model=draft, max_new_tokens=6)
    assert stats.rounds > 0 and calls == [1]
    assert target._get_candidate_generator is outer
