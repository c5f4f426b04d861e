"""Acceptance counts of speculative decoding and prompt lookup, for any target model.

transformers calls its candidate generator's ``update_candidate_strategy(input_ids, scores, n_matches)``
once per verification round; ``track_acceptance`` wraps that call on the generators ``model``
creates inside the ``with`` block and records how many drafted tokens each round accepted.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from transformers import PreTrainedModel


@dataclass
class AcceptanceStats:
    """Per verification round: tokens drafted and drafted tokens accepted (the target adds one more each round)."""

    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    @property
    def rounds(self) -> int:
        return len(self.accepted)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens over all rounds (0 if nothing was drafted)."""
        return sum(self.accepted) / max(1, sum(self.drafted))

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per target forward: accepted drafts + the target's own token."""
        return (sum(self.accepted) + self.rounds) / max(1, self.rounds)


@contextmanager
def track_acceptance(model: PreTrainedModel) -> Iterator[AcceptanceStats]:
    """Within the block, ``model.generate`` with an assistant or prompt lookup records into the stats."""
    stats = AcceptanceStats()
    make_generator = model._get_candidate_generator
    wrapped_before = model.__dict__.get("_get_candidate_generator")  # another wrapper on this instance, if any

    def tracked(*args, **kwargs):
        generator = make_generator(*args, **kwargs)
        update = generator.update_candidate_strategy

        def record(input_ids, scores, num_matches):
            stats.drafted.append(int(scores.shape[1]) - 1)
            stats.accepted.append(int(num_matches))
            return update(input_ids, scores, num_matches)

        generator.update_candidate_strategy = record
        return generator

    model._get_candidate_generator = tracked
    try:
        yield stats
    finally:  # back to what was there: the class's method, or the wrapper installed before (nested use)
        if wrapped_before is None:
            model.__dict__.pop("_get_candidate_generator", None)
        else:
            model._get_candidate_generator = wrapped_before
