"""Lookahead decoding: ``lookahead_generate(model, input_ids, ...)`` and the ``custom_generate`` entry points.

The implementation lives in ``custom_generate/generate.py`` so that the same file also serves
``model.generate(custom_generate=CUSTOM_GENERATE_DIR, trust_remote_code=True)`` where hf_linattn is
not installed (transformers loads that file on its own).
"""

from __future__ import annotations

from pathlib import Path

from .custom_generate.generate import LookaheadStats, lookahead_decoding, lookahead_generate

# The folder to pass as ``custom_generate=`` (it holds custom_generate/generate.py); push it to the Hub as is.
CUSTOM_GENERATE_DIR = Path(__file__).resolve().parent

__all__ = ["CUSTOM_GENERATE_DIR", "LookaheadStats", "lookahead_decoding", "lookahead_generate"]
