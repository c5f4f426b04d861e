"""Loading a base checkpoint for conversion, with one clear error per kind of bad input.

Weights load from safetensors only: a folder with only pickle weights (``pytorch_model.bin``) is
refused rather than unpickled. The architecture is checked from config.json before any weight
is read, and the tokenizer must fit the model's embedding table.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .transfer import SUPPORTED_MODEL_TYPES, UnsupportedBaseModelError


class MissingCheckpointFileError(FileNotFoundError):
    """A checkpoint folder lacks a file that loading needs (config, safetensors weights, tokenizer)."""


class TokenizerMismatchError(ValueError):
    """Two models, or a model and a tokenizer, do not share one vocabulary."""


def check_checkpoint_dir(path: Path) -> None:
    """Raise MissingCheckpointFileError unless ``path`` holds config.json and safetensors weights."""
    if not path.is_dir():
        raise MissingCheckpointFileError(f"{path}: no such checkpoint folder")
    if not (path / "config.json").is_file():
        raise MissingCheckpointFileError(f"{path}: no config.json; is this a transformers checkpoint folder?")
    if not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").is_file():
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = ""
        if pickled:
            hint = f" (found {', '.join(pickled)}: pickle weights are never loaded; resave them as safetensors)"
        raise MissingCheckpointFileError(f"{path}: no .safetensors weights{hint}")


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, vocab_size: int, where: str) -> None:
    """The tokenizer's ids must all index the model's embedding table, and it needs an EOS token."""
    if len(tokenizer) > vocab_size:
        raise TokenizerMismatchError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab_size}; "
            "this tokenizer does not belong to this model"
        )
    if tokenizer.eos_token_id is None:
        raise TokenizerMismatchError(f"{where}: the tokenizer defines no eos token")


def check_same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase, what: str) -> None:
    """Raise TokenizerMismatchError unless ``a`` and ``b`` map every token to the same id."""
    if a.get_vocab() != b.get_vocab():
        only_a = len(set(a.get_vocab().items()) - set(b.get_vocab().items()))
        raise TokenizerMismatchError(
            f"{what}: the tokenizers differ ({only_a} token/id pairs of the first are not in the second)"
        )


def load_base(
    base: str | Path, tokenizer_path: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, torch.dtype]:
    """The base causal LM (a local folder or a hub id) in ``dtype``, its tokenizer, and the dtype it is stored in.

    Everything is checked (files, architecture, tokenizer) before any weight is read.
    """
    local = Path(base)
    if local.exists() or str(base).startswith((".", "/", "~")):
        check_checkpoint_dir(local)
    config = AutoConfig.from_pretrained(str(base))
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedBaseModelError(
            f"cannot linearize {base} (model_type {config.model_type!r}): supported base architectures are "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path or base))
    except (OSError, ValueError) as err:
        raise MissingCheckpointFileError(f"{tokenizer_path or base}: no loadable tokenizer ({err})") from err
    check_tokenizer(tokenizer, config.vocab_size, str(tokenizer_path or base))
    stored = config.dtype if isinstance(config.dtype, torch.dtype) else getattr(torch, config.dtype or "float32")
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype, use_safetensors=True)
    return model.eval(), tokenizer, stored
