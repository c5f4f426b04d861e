"""The embedded teacher, draft, tokenizer and held-out text (trained by ``hf_linattn.assets.train``).

- ``TEACHER_DIR``: a small LlamaForCausalLM trained on the Python standard library, with its tokenizer.
- ``DRAFT_DIR``: a much smaller LlamaForCausalLM on the same tokenizer, for speculative decoding.
- ``HELDOUT_PATH``: held-out stdlib files (never trained on), joined by the document separator.
- ``TRAINING_RECORD``: corpus hash, hyperparameters, losses and perplexities of the run that made them.
"""

from __future__ import annotations

from pathlib import Path

from .corpus import DOCUMENT_SEPARATOR, training_documents

ASSETS_DIR = Path(__file__).parent
TEACHER_DIR = ASSETS_DIR / "teacher"
DRAFT_DIR = ASSETS_DIR / "draft"
HELDOUT_PATH = ASSETS_DIR / "heldout.txt"
TRAINING_RECORD = ASSETS_DIR / "training_record.json"


def heldout_texts() -> list[str]:
    """The held-out documents, in their committed order."""
    return [t for t in HELDOUT_PATH.read_text(encoding="utf-8").split(DOCUMENT_SEPARATOR) if t]


def training_texts() -> list[str]:
    """The embedded training corpus: this machine's stdlib source minus the held-out files."""
    return [text for _, text in training_documents()]


__all__ = ["DRAFT_DIR", "HELDOUT_PATH", "TEACHER_DIR", "TRAINING_RECORD", "heldout_texts", "training_texts"]
