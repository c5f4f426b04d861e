"""Decoding strategies for hf_linattn models (and plain transformers causal LMs).

- speculative decoding and prompt lookup run through ``model.generate(assistant_model=...)`` and
  ``generate(prompt_lookup_num_tokens=...)``: LinAttnCache rolls back exactly (``crop``);
  ``track_acceptance`` exposes how many drafted tokens each round accepted;
- ``num_assistant_tokens_schedule="adaptive"`` (any target, once this package is imported): the draft length of
  each round is chosen from the measured acceptance and draft / verify costs (``adaptive.py``);
- lookahead decoding (draft-free, parallel): ``lookahead_generate(model, input_ids, ...)``, or
  ``model.generate(ids, custom_generate=lookahead_decoding)`` / ``custom_generate=str(CUSTOM_GENERATE_DIR)``.
"""

from .acceptance import AcceptanceStats, track_acceptance
from .adaptive import ADAPTIVE_SCHEDULES, DraftLengthPolicy, draft_length_policy
from .lookahead import CUSTOM_GENERATE_DIR, LookaheadStats, lookahead_decoding, lookahead_generate

__all__ = [
    "ADAPTIVE_SCHEDULES",
    "CUSTOM_GENERATE_DIR",
    "AcceptanceStats",
    "DraftLengthPolicy",
    "LookaheadStats",
    "draft_length_policy",
    "lookahead_decoding",
    "lookahead_generate",
    "track_acceptance",
]
