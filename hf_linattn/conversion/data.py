"""Conversion data: text sources, one token stream, and deterministic batches indexed by step.

Batches are a pure function of (seed, step), so a resumed run sees exactly the batches the
interrupted one would have, and every process of a multi-process run agrees on the global batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from hf_linattn.errors import InputError


class DataError(InputError, ValueError):
    """A text source cannot be read: missing, empty of text files, or not UTF-8."""


TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".json", ".jsonl", ".c", ".h", ".js", ".ts", ".rs", ".go", ".java"}


def read_text_sources(paths: Iterable[str | Path], flag: str = "--data") -> list[tuple[str, str]]:
    """(name, text) of every file: a path is a text file or a folder searched recursively for text suffixes.

    ``flag`` names the option the paths came from, in error messages.
    """
    documents = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"{flag} {path}: no such file or folder")
        files = [path]
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            suffixes = ", ".join(sorted(TEXT_SUFFIXES))
            raise DataError(f"{flag} {path}: the folder holds no text files ({suffixes})")
        for file in files:
            try:
                text = file.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{flag} {file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
            if text:
                documents.append((str(file), text))
    return documents


def token_stream(
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    max_tokens: int | None = None,
    progress: bool = False,
    desc: str = "tokenizing",
) -> torch.Tensor:
    """Documents joined into one stream [N], each followed by EOS; stops once ``max_tokens`` are reached.

    With ``progress``, a bar counts tokens (up to ``max_tokens``): tokenizing the default corpus takes seconds.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token to separate documents")
    ids: list[int] = []
    with tqdm(total=max_tokens, desc=desc, unit="tok", unit_scale=True, disable=not progress) as bar:
        for text in texts:
            before = len(ids)
            ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
            ids.append(eos)
            bar.update(min(len(ids), max_tokens or len(ids)) - min(before, max_tokens or before))
            if max_tokens is not None and len(ids) >= max_tokens:
                break
        bar.total = bar.n  # the texts may end before max_tokens: the bar still ends at 100%
        bar.refresh()
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def check_training_tokens(tokens: torch.Tensor, seq_len: int) -> None:
    """Raise DataError unless ``tokens`` holds more than one training window of ``seq_len``."""
    if tokens.numel() <= seq_len + 1:
        raise DataError(
            f"the training data has {tokens.numel()} tokens; one window of --seq-len {seq_len} needs {seq_len + 2}: "
            "give more --data or a smaller --seq-len"
        )


def batch_for_step(tokens: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """The global batch [batch_size, seq_len] of ``step``: random windows of ``tokens`` chosen by (seed, step)."""
    check_training_tokens(tokens, seq_len)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=gen)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def shard(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This process's rows of a global batch (rows rank, rank + world, ...)."""
    if batch.shape[0] % world:
        raise ValueError(f"batch size {batch.shape[0]} does not split over {world} processes")
    return batch[rank::world]
