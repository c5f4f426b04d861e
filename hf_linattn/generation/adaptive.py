"""Speculative decoding with an adaptive draft length: ``num_assistant_tokens_schedule="adaptive"``.

transformers' schedules tune the number K of drafted tokens per round blindly ("heuristic": +2 after a
full acceptance, -1 otherwise) or not at all ("constant"). The ``"adaptive"`` schedule measures what
the choice depends on, while generating:

- the acceptance rate a: an online, exponentially weighted estimate of the per-token acceptance;
- the cost of one round: the draft's ``generate()`` call D(K) and the target's verify forward V(K)
  (with the rest of the round: acceptance, crop, stopping criteria), each fitted as a line in K
  from timings of the rounds so far (thread CPU time when both models are on CPU, else wall time);

and drafts the K that maximises the expected committed tokens per second (Leviathan et al. 2023,
i.i.d. acceptance): E[tokens | K] / (D(K) + V(K)), E[tokens | K] = (1 - a^(K+1)) / (1 - a), with
D(0) = 0: K = 0 is a plain target step, chosen when the draft does not pay (then, after
``probe_every`` such rounds, two rounds draft 1 or 4 tokens, so that the estimates can recover; the
wait doubles after each probe that changes nothing).
Only the length changes; transformers' acceptance rule is untouched, so greedy output equals plain
greedy and sampling stays exact. transformers still caps K by ``max_length``.

Turn it on with the assistant's generation config or a ``generate()`` argument, once
``hf_linattn.generation`` is imported (for any target model, ours or not)::

    import hf_linattn.generation
    out = target.generate(ids, assistant_model=draft, num_assistant_tokens_schedule="adaptive")

``num_assistant_tokens`` (default 20) is the largest K. ``"adaptive"`` keeps what it learned for the
next ``generate()`` call with the same (target, draft) pair (see ``draft_length_policy``);
``"adaptive_transient"`` starts afresh each call. The assistant's confidence threshold is off under
these schedules unless it is set explicitly on the assistant's generation config.
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from transformers import GenerationMixin, PreTrainedModel
from transformers.generation.candidate_generator import AssistedCandidateGenerator

ADAPTIVE_SCHEDULES = ("adaptive", "adaptive_transient")


def expected_committed_tokens(acceptance: float, draft_length: int) -> float:
    """E[tokens committed by one round | K drafted] = sum_{i<=K} a^i = (1 - a^(K+1)) / (1 - a)."""
    return sum(acceptance**i for i in range(draft_length + 1))


@dataclass
class CostCurve:
    """Seconds of one part of a round as a function of K: ``intercept + slope * K``.

    Each K keeps its last ``window`` timings; its cost is their lower quartile, because the noise of
    a shared machine only ever adds time (preemption, a neighbour's burst) and one slow round must
    not make a length look expensive for long. The line is a least-squares fit through those
    per-K costs (weighted by their number of timings), so lengths never timed are extrapolated;
    its slope is clamped at >= 0, so noise cannot make longer drafts look free.
    """

    window: int = 8
    samples: dict[int, deque] = field(default_factory=dict)
    intercept: float = 0.0
    slope: float = 0.0

    def add(self, draft_length: int, seconds: float) -> None:
        self.samples.setdefault(draft_length, deque(maxlen=self.window)).append(seconds)
        points = [(k, sorted(t)[len(t) // 4], len(t)) for k, t in self.samples.items()]
        w = sum(n for _, _, n in points)
        k_mean = sum(k * n for k, _, n in points) / w
        t_mean = sum(c * n for _, c, n in points) / w
        variance = sum(n * (k - k_mean) ** 2 for k, _, n in points)
        if variance > 0:
            self.slope = max(0.0, sum(n * (k - k_mean) * (c - t_mean) for k, c, n in points) / variance)
        self.intercept = max(0.0, t_mean - self.slope * k_mean)

    @property
    def lengths(self) -> set[int]:
        """The K timed so far."""
        return set(self.samples)

    def __call__(self, draft_length: int) -> float:
        return self.intercept + self.slope * draft_length


def best_draft_length(
    acceptance: float, draft_cost: CostCurve, verify_cost: CostCurve, max_length: int, allow_zero: bool = True
) -> int:
    """argmax_K E[tokens | K] / (D(K) + V(K)) over K in [0 or 1, max_length], with D(0) = 0.

    Among settings within 1 % of the best rate the shortest wins: a shorter draft loses less when
    the acceptance estimate is optimistic.
    """
    lengths = range(0 if allow_zero else 1, max(max_length, 0) + 1)
    if not lengths:
        return 0
    rates = {}
    for k in lengths:
        seconds = verify_cost(k) + (draft_cost(k) if k > 0 else 0.0)
        rates[k] = expected_committed_tokens(acceptance, k) / max(seconds, 1e-9)
    best = max(rates.values())
    return next(k for k in lengths if rates[k] >= 0.99 * best)


@dataclass
class DraftLengthPolicy:
    """The adaptive schedule's state for one (target, draft) pair: acceptance estimate, cost lines, chosen K.

    - ``acceptance``: (decayed accepted + prior) / (decayed trials + prior weight); a round that
      accepted m of K drafted tokens is m successes and, if m < K, one failure;
    - ``draft_cost`` D(K) and ``verify_cost`` V(K): see ``CostCurve``;
    - ``history``: the K chosen for each round (after transformers' max_length cap it may draft fewer).
    """

    max_tokens: int = 20
    first_length: int = 4
    prior_acceptance: float = 0.5
    prior_weight: float = 2.0
    decay: float = 0.95
    probe_every: int = 8
    calibration_timings: int = 2
    draft_cost: CostCurve = field(default_factory=CostCurve)
    verify_cost: CostCurve = field(default_factory=CostCurve)
    history: list[int] = field(default_factory=list)
    _accepted: float = 0.0
    _trials: float = 0.0
    _idle_rounds: int = 0
    _probe_left: int = 0
    _probe_length: int = 1
    _probes: int = 0
    _probe_interval: int = 0  # rounds of K = 0 before the next probe (0: probe_every)

    @property
    def acceptance(self) -> float:
        return (self._accepted + self.prior_acceptance * self.prior_weight) / (self._trials + self.prior_weight)

    def observe_acceptance(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        self._accepted = self.decay * self._accepted + accepted
        self._trials = self.decay * self._trials + accepted + (1 if accepted < drafted else 0)

    def next_length(self, budget: int, minimum: int = 0) -> int:
        """K for the next round; ``budget``: the most tokens transformers lets the draft add (max_length cap);
        ``minimum``: the least K (1 in a generate() call's first round: the draft must see the prompt then)."""
        cap = min(self.max_tokens, budget)
        timed = sum(len(t) >= self.calibration_timings for t in self.draft_cost.samples.values())
        if cap <= 0:
            k = 0
        elif cap >= 2 and timed < 2:
            # calibration: time two different K before trusting the lines' slopes; alternate, since a round
            # that prefills (the first) or catches up (after K = 0 rounds) is not timed
            pair = (min(self.first_length, cap), 1)
            k = pair[1] if self.history and self.history[-1] == pair[0] else pair[0]
        elif self._probe_left > 0:
            k, self._probe_left = min(self._probe_length, cap), self._probe_left - 1
        else:
            k = best_draft_length(self.acceptance, self.draft_cost, self.verify_cost, cap)
            self._idle_rounds = self._idle_rounds + 1 if k == 0 else 0
            if k > 0:
                self._probe_interval = self.probe_every
            elif self._idle_rounds >= (self._probe_interval or self.probe_every):
                # probe: keeps the acceptance estimate and both calibration lengths' costs fresh (a slow round
                # must not keep the draft off for good); two rounds, since the first one catches the draft up on
                # the skipped tokens and is not timed. Each probe that changes nothing doubles the wait (up to
                # 8x), so that a draft that does not pay costs little.
                self._probes += 1
                self._probe_length = 1 if self._probes % 2 else min(self.first_length, cap)
                k, self._probe_left, self._idle_rounds = self._probe_length, 1, 0
                self._probe_interval = min(2 * (self._probe_interval or self.probe_every), 8 * self.probe_every)
        k = max(k, min(minimum, cap))
        self.history.append(k)
        return k


class AdaptiveCandidateGenerator:
    """Wraps transformers' ``AssistedCandidateGenerator``: sets its ``num_assistant_tokens`` each round from the
    policy and times the round. Everything else (drafting, acceptance) is the wrapped generator's."""

    def __init__(
        self, inner: AssistedCandidateGenerator, policy: DraftLengthPolicy, max_length: int, target_device
    ) -> None:
        self.inner = inner
        # On CPU the round is timed in thread CPU time: a shared machine's preemptions do not count, so one
        # busy neighbour cannot make a draft length look slow. On an accelerator the host waits for the device,
        # so wall time it is.
        on_cpu = target_device.type == "cpu" and inner.assistant_model.device.type == "cpu"
        self._clock = time.thread_time if on_cpu else time.perf_counter
        self.policy = policy
        self.max_length = max_length
        self._drafted = 0  # K of the round in flight
        self._verify_start: float | None = None  # when the last draft returned (the target's verify starts)
        self._rounds = 0
        self._timed = False  # the round in flight is timed (not a prefill, not a catch-up after idle rounds)

    def __getattr__(self, name: str) -> Any:  # requires_model_outputs, assistant_model, ...
        return getattr(self.inner, name)

    def get_candidates(self, input_ids, *args, **kwargs):
        """transformers' call: returns (candidate ids [1, T + K], draft logits [1, K, V] or None)."""
        start = self._clock()
        if self._verify_start is not None and self._timed:
            # previous round's verify forward, acceptance, crop and loop overhead
            self.policy.verify_cost.add(self._drafted, start - self._verify_start)
        # transformers updates the draft's inputs only once it holds a cache: the first round must draft
        k = self.policy.next_length(self.max_length - input_ids.shape[-1] - 1, minimum=1 if self._rounds == 0 else 0)
        self.inner.num_assistant_tokens = k
        candidates, logits = self.inner.get_candidates(input_ids, *args, **kwargs)
        end = self._clock()
        drafted = candidates.shape[-1] - input_ids.shape[-1]
        # the first round prefills both models; after K = 0 rounds the draft first catches up on the skipped tokens
        self._timed = self._rounds > 0
        if self._timed and drafted > 0 and self._drafted > 0:
            self.policy.draft_cost.add(drafted, end - start)
        self._drafted, self._verify_start, self._rounds = drafted, end, self._rounds + 1
        return candidates, logits

    def update_candidate_strategy(self, input_ids, scores, num_matches: int):
        """transformers' call after verification: scores [1, K + 1, V]; ``num_matches`` accepted drafted tokens."""
        if input_ids.shape[-1] < self.max_length:  # at max_length, transformers cut the accepted run short
            self.policy.observe_acceptance(drafted=int(scores.shape[1]) - 1, accepted=int(num_matches))
        return self.inner.update_candidate_strategy(input_ids, scores, num_matches)


# target -> {assistant -> {schedule -> DraftLengthPolicy}}
_POLICIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def draft_length_policy(
    target: PreTrainedModel, assistant: PreTrainedModel, schedule: str = "adaptive"
) -> DraftLengthPolicy | None:
    """What ``schedule`` learned for this pair (acceptance, cost lines, K per round), or None; for
    ``"adaptive_transient"``, the last generate() call's."""
    return _POLICIES.get(target, {}).get(assistant, {}).get(schedule)


def _wants_adaptive(generation_config, assistant_model) -> bool:
    return bool(_schedules(generation_config, assistant_model) & set(ADAPTIVE_SCHEDULES))


def _schedules(generation_config, assistant_model) -> set[str | None]:
    """The schedule of the generate() call and the assistant's own: either may ask for "adaptive"."""
    return {
        generation_config.num_assistant_tokens_schedule,
        assistant_model.generation_config.num_assistant_tokens_schedule,
    }


def _adaptive_get_candidate_generator(self, *args, **kwargs):
    """``GenerationMixin._get_candidate_generator``; wraps the assisted generator when the schedule is adaptive."""
    generator = _ORIGINAL(self, *args, **kwargs)
    assistant = kwargs.get("assistant_model")
    config = kwargs.get("generation_config")
    if assistant is None or config is None or not isinstance(generator, AssistedCandidateGenerator):
        return generator
    if not _wants_adaptive(config, assistant):
        return generator
    schedule = "adaptive_transient" if "adaptive_transient" in _schedules(config, assistant) else "adaptive"
    policies = _POLICIES.setdefault(self, weakref.WeakKeyDictionary()).setdefault(assistant, {})
    policy = policies.get(schedule)
    if policy is None or schedule == "adaptive_transient":  # a transient call never touches the persistent one
        policy = policies[schedule] = DraftLengthPolicy(max_tokens=int(generator.num_assistant_tokens))
    if assistant.generation_config.assistant_confidence_threshold is None:
        # the policy chooses the length; the confidence stop (and its ROC re-tuning) stays off unless asked for
        generator.assistant_confidence_threshold = 0.0
        generator.generation_config.assistant_confidence_threshold = 0.0
        generator.assistant_generation_config.assistant_confidence_threshold = 0.0
    return AdaptiveCandidateGenerator(generator, policy, max_length=config.max_length, target_device=self.device)


_ORIGINAL = getattr(
    GenerationMixin._get_candidate_generator, "_hf_linattn_original", GenerationMixin._get_candidate_generator
)
_adaptive_get_candidate_generator._hf_linattn_original = _ORIGINAL


def install() -> None:
    """Make every model's ``generate()`` understand the adaptive schedules (done on import; idempotent)."""
    GenerationMixin._get_candidate_generator = _adaptive_get_candidate_generator


install()

__all__ = [
    "ADAPTIVE_SCHEDULES",
    "AdaptiveCandidateGenerator",
    "CostCurve",
    "DraftLengthPolicy",
    "best_draft_length",
    "draft_length_policy",
    "expected_committed_tokens",
    "install",
]
