"""Held-out evaluation: perplexity, a unigram baseline and greedy agreement between two models."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .generation_eval import COMPLETION_PROMPTS


def windows(tokens: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [N, seq_len] of a 1-D token stream (the tail that does not fill one is dropped)."""
    if tokens.dim() != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tuple(tokens.shape)}")
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    n = tokens.numel() // seq_len
    if n == 0:
        raise ValueError(f"{tokens.numel()} tokens do not fill one window of {seq_len}")
    return tokens[: n * seq_len].view(n, seq_len)


def _batches(rows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, rows.shape[0], batch_size):
        yield rows[start : start + batch_size]


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    tokens: torch.Tensor,
    seq_len: int = 512,
    batch_size: int = 4,
    max_tokens: int | None = None,
    progress: bool = False,
    desc: str = "perplexity",
) -> float:
    """exp(mean next-token cross-entropy) over non-overlapping ``seq_len`` windows of ``tokens`` [N]."""
    model.eval()
    rows = windows(tokens, seq_len, max_tokens)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in tqdm(list(_batches(rows, batch_size)), desc=desc, disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def unigram_perplexity(train_tokens: torch.Tensor, eval_tokens: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of add-one-smoothed unigram frequencies from ``train_tokens``: the floor a model must beat."""
    counts = torch.bincount(train_tokens, minlength=vocab_size).double() + 1.0
    log_p = (counts / counts.sum()).log()
    return math.exp(-log_p[eval_tokens].mean().item())


@torch.no_grad()
def greedy_agreement(
    model: PreTrainedModel,
    reference: PreTrainedModel,
    prompts: torch.Tensor,
    max_new_tokens: int = 32,
    progress: bool = False,
) -> dict[str, float]:
    """Greedy-generate from each prompt row [N, T] with both models (through ``generate()``).

    Returns the fraction of generated positions where the tokens agree, and the mean length of
    the agreeing prefix (what speculative decoding would accept).
    """
    if prompts.shape[0] == 0 or max_new_tokens <= 0:
        raise ValueError(f"greedy agreement needs at least one prompt and one new token, got {tuple(prompts.shape)} "
                         f"prompts and max_new_tokens={max_new_tokens}")  # fmt: skip
    same, prefix = 0, 0
    for row in tqdm(prompts, desc="greedy agreement", disable=not progress):
        ids = row[None]
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                      do_sample=False, pad_token_id=0, eos_token_id=None)  # fmt: skip
        a = model.generate(ids, **kwargs)[0, ids.shape[1] :]
        b = reference.generate(ids, **kwargs)[0, ids.shape[1] :]
        match = (a == b).long()
        same += match.sum().item()
        prefix += match.cumprod(0).sum().item()
    n = prompts.shape[0]
    return {"token_agreement": same / (n * max_new_tokens), "mean_agreeing_prefix": prefix / n}


def evaluate_checkpoint(
    model_path: str,
    teacher_path: str | None = None,
    eval_data: list[str] | None = None,
    eval_tokens: int = 65536,
    seq_len: int = 512,
    batch_size: int = 4,
    agreement_prompts: int = 8,
    completion_prompts: int = COMPLETION_PROMPTS,
    passkey_lengths: list[int] | None = None,
    passkey_trials: int = 2,
    progress: bool = True,
) -> dict:
    """``hf-linattn eval``: held-out perplexity, line completion and (if asked) passkey accuracy of a checkpoint;
    with a teacher, the teacher's too and the greedy agreement.

    Any causal LM folder or Hub id loads (ours through trust_remote_code); the teacher must share the
    tokenizer. The report stores absolute paths (or Hub ids), so it means the same from any directory.
    completion_prompts / passkey_lengths: 0 / None skip those metrics (``generation_eval``).
    """
    from pathlib import Path

    from hf_linattn.assets import heldout_texts

    from .data import DataError, read_text_sources, token_stream
    from .generation_eval import completion_prompts as select_prompts
    from .generation_eval import line_completion_report, passkey_report
    from .loading import (
        check_checkpoint_dir,
        check_same_tokenizer,
        check_tokenizer,
        load_causal_lm,
        load_tokenizer,
        resolve_source,
    )

    model_path = resolve_source(model_path, "model")
    teacher_path = resolve_source(teacher_path, "--teacher") if teacher_path else None
    for path in filter(None, (model_path, teacher_path)):
        if Path(path).is_dir():
            check_checkpoint_dir(Path(path))
    for path in eval_data or []:
        if not Path(path).exists():
            raise DataError(f"--eval-data {path}: no such file or folder")
    eval_data = [str(Path(p).resolve()) for p in eval_data or []]
    tokenizer = load_tokenizer(model_path, "save the tokenizer of its base model into it")
    model = load_causal_lm(model_path, trust_remote_code=True)
    check_tokenizer(tokenizer, model.config.vocab_size, model_path)
    texts = [t for _, t in read_text_sources(eval_data, "--eval-data")] if eval_data else heldout_texts()
    lines = select_prompts(texts, completion_prompts) if completion_prompts else []  # refused before any model runs
    held = token_stream(tokenizer, texts, eval_tokens, progress, "tokenizing held-out")
    if held.numel() < seq_len:
        count = held.numel()
        raise DataError(f"{count} held-out tokens (--eval-tokens, --eval-data) fill no window of --seq-len {seq_len}")
    report: dict = {"model": model_path, "heldout_tokens": held.numel(), "seq_len": seq_len,
                    "eval_data": eval_data or "embedded heldout.txt"}  # fmt: skip
    report["perplexity"] = round(perplexity(model, held, seq_len, batch_size, progress=progress, desc="model ppl"), 4)
    teacher = None
    if teacher_path:
        teacher_tokenizer = load_tokenizer(teacher_path, "pass a --teacher that has its tokenizer files")
        check_same_tokenizer(tokenizer, teacher_tokenizer, f"{model_path} vs {teacher_path}")
        teacher = load_causal_lm(teacher_path, trust_remote_code=True)
        report["teacher"] = teacher_path
        report["teacher_perplexity"] = round(
            perplexity(teacher, held, seq_len, batch_size, progress=progress, desc="teacher ppl"), 4
        )
        report["perplexity_ratio"] = round(report["perplexity"] / report["teacher_perplexity"], 4)
        prompts = windows(held, 64)[:agreement_prompts]
        report["greedy_agreement"] = greedy_agreement(model, teacher, prompts, 32, progress)
    if lines:
        report["line_completion"] = line_completion_report(model, tokenizer, lines, teacher=teacher, progress=progress)
    if passkey_lengths:
        report["passkey"] = passkey_report(model, tokenizer, held, passkey_lengths, passkey_trials, teacher=teacher,
                                           progress=progress)  # fmt: skip
    return report
