"""Loading a base checkpoint for conversion, with one clear error per kind of bad input.

Weights load from safetensors only: a folder with only pickle weights (``pytorch_model.bin``) is
refused rather than unpickled. The architecture is checked from config.json before any weight
is read, and the tokenizer must fit the model's embedding table. Weights that lack a tensor are
refused by name (transformers would initialize it at random and only log it). A name that is
neither a local folder nor shaped like a Hub id is refused as a missing folder, without a network
call. Each refusal is an ``hf_linattn.errors.InputError``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from hf_linattn.errors import InputError, one_line

from .transfer import SUPPORTED_MODEL_TYPES, UnsupportedBaseModelError

# owner/name, as the Hub spells repo ids; a name without an owner is taken for a (missing) local folder
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
T = TypeVar("T")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class MissingCheckpointFileError(InputError, FileNotFoundError):
    """A checkpoint folder lacks a file that loading needs (config, safetensors weights, tokenizer)."""


class IncompleteWeightsError(InputError, ValueError):
    """The safetensors weights lack tensors the model needs, or hold tensors of the wrong shape."""


class TokenizerMismatchError(InputError, ValueError):
    """Two models, or a model and a tokenizer, do not share one vocabulary."""


def resolve_source(name: str | Path, what: str) -> str:
    """An existing local folder as an absolute path, or a Hub id (owner/name) as given; refuse anything else.

    ``what`` names the input in the message (e.g. "base checkpoint"). A name that is neither a
    folder nor shaped like a Hub id is reported as a missing folder at once, without a network call.
    """
    text = str(name)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MissingCheckpointFileError(f"{what} {text}: is a file, not a checkpoint folder or a Hub id")
        return str(path.resolve())
    if _HUB_ID.match(text) and ".." not in text:
        return text
    hint = "" if "/" in text else " (a Hub id has the form owner/name)"
    raise MissingCheckpointFileError(f"{what} {text}: no such local folder{hint}")


def _is_local(source: str) -> bool:
    return Path(source).is_dir()


@contextlib.contextmanager
def _transformers_errors_only() -> Iterator[None]:
    """Hide transformers' own warnings (its load report): our checks report what matters, once."""
    level = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.utils.logging.set_verbosity(level)


def _from_hub(loader: Callable[..., T], source: str, what: str, **kwargs: Any) -> T:
    """Call a transformers loader; a Hub id that cannot be fetched is one InputError."""
    try:
        return loader(source, **kwargs)
    except OSError as err:
        if _is_local(source):
            raise
        reason = one_line(err)
        raise InputError(f"{what} {source}: not a local folder, and the Hub did not provide it ({reason})") from err


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


def load_tokenizer(source: str, missing_hint: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a local folder or Hub id; a folder without tokenizer files is refused with ``missing_hint``."""
    if _is_local(source) and not any((Path(source) / name).is_file() for name in TOKENIZER_FILES):
        raise MissingCheckpointFileError(f"{source}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); {missing_hint}")
    try:
        return _from_hub(AutoTokenizer.from_pretrained, source, "tokenizer")
    except (OSError, ValueError) as err:
        reason = one_line(err)
        raise MissingCheckpointFileError(f"{source}: the tokenizer does not load ({reason}); {missing_hint}") from err


def load_causal_lm(source: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> PreTrainedModel:
    """A causal LM from safetensors; refused when the weights lack a tensor or hold one of the wrong shape.

    transformers would initialize a missing tensor at random and only log it.
    """
    with _transformers_errors_only():
        model, info = _from_hub(
            AutoModelForCausalLM.from_pretrained, source, "model", dtype=dtype, use_safetensors=True,
            trust_remote_code=trust_remote_code, output_loading_info=True, ignore_mismatched_sizes=True,
        )  # fmt: skip
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise IncompleteWeightsError(
            f"{source}: the safetensors weights lack {len(missing)} tensor(s) the model needs "
            f"({', '.join(missing[:5])}{more}); the checkpoint is incomplete"
        )
    mismatched = sorted(str(item[0] if isinstance(item, tuple) else item) for item in info.get("mismatched_keys") or [])
    if mismatched:
        raise IncompleteWeightsError(
            f"{source}: tensors of the wrong shape for config.json ({', '.join(mismatched[:5])}); "
            "the weights and the config do not belong together"
        )
    return model.eval()


def load_base(
    base: str | Path, tokenizer_path: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, torch.dtype]:
    """The base causal LM (a local folder or a Hub id) in ``dtype``, its tokenizer, and the dtype it is stored in.

    Everything is checked (files, architecture, tokenizer) before any weight is read, and the
    weights must provide every tensor.
    """
    base = resolve_source(base, "base checkpoint")
    if _is_local(base):
        check_checkpoint_dir(Path(base))
    config = _from_hub(AutoConfig.from_pretrained, base, "base checkpoint")
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedBaseModelError(
            f"cannot linearize {base} (model_type {config.model_type!r}): supported base architectures are "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    source = resolve_source(tokenizer_path, "--tokenizer") if tokenizer_path else base
    hint = "check --tokenizer" if tokenizer_path else "pass --tokenizer with the folder or Hub id of its tokenizer"
    tokenizer = load_tokenizer(source, hint)
    check_tokenizer(tokenizer, config.vocab_size, source)
    stored = config.dtype if isinstance(config.dtype, torch.dtype) else getattr(torch, config.dtype or "float32")
    return load_causal_lm(base, dtype=dtype), tokenizer, stored
