"""Generation metrics, teacher vs student: exact-match next-line completion and passkey retrieval.

Line completion: a deterministic selection of held-out code lines; the prompt is the code before the
line (at most ``max_context_chars``), greedy ``generate()`` runs until a newline (at most
``max_new_tokens``), and the completion must equal the rest of the line exactly. The same prompts
form the lm-evaluation-harness ``generate_until`` task of ``hf-linattn lm-eval-task``, and our
decoding mirrors lm_eval's HF backend (prompt tokenized as is, output decoded without special
tokens, cut at the first newline), so both give the same number.

Passkey: ``PASSKEY = 12345`` hidden at a depth of held-out code filler, the prompt ends with
``assert PASSKEY ==`` and the greedy answer's first integer must equal the key.
"""

from __future__ import annotations

import random
import re

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from hf_linattn.errors import InputError

COMPLETION_PROMPTS = 64  # prompts in reports and the lm_eval task: seconds on CPU for the embedded models
MAX_CONTEXT_CHARS = 512  # at most 256 tokens of code for the embedded tokenizer
MAX_NEW_TOKENS = 32
MIN_CONTEXT_LINES = 8
PASSKEY_DEPTHS = (0.1, 0.5, 0.9)  # where the key sits in the filler, as a fraction of it
PASSKEY_NEW_TOKENS = 8
_NEEDLE, _QUESTION = "\nPASSKEY = {key}\n", "\nassert PASSKEY =="


class EvalInputError(InputError, ValueError):
    """A generation-metric setting cannot be used (too few prompts available, a context too short)."""


def _split_line(prev: str, line: str) -> tuple[str, str] | None:
    """(context, target) for one line after the text ``prev``, or None when the line is not a useful target.

    The split sits one space before the code of an indented line: GPT-2-style pre-tokenizers merge a
    newline with all but the last space of the indentation, so the prompt ends on a token the model
    saw in training, and the target starts with that last space (``" return x"``). An unindented
    line after a blank one is left out: there the tokenizer would split the blank lines' newlines
    differently with and without the target.
    """
    code = line.strip()
    if len(code) < 4 or code.startswith("#") or len(line) > 120:
        return None
    indent = len(line) - len(line.lstrip(" "))
    if line[indent : indent + 1] == "\t" or (indent == 0 and prev.endswith("\n\n")):
        return None
    cut = max(indent - 1, 0)
    return prev + line[:cut], line[cut:].rstrip()


def completion_prompts(
    texts: list[str], n_prompts: int = COMPLETION_PROMPTS, max_context_chars: int = MAX_CONTEXT_CHARS
) -> list[dict[str, str]]:
    """``n_prompts`` {"context", "target"} pairs evenly spaced over every usable line of ``texts`` (deterministic).

    A usable line is code (not blank, not a comment, not in or opening a docstring, at most 120
    characters) with at least ``MIN_CONTEXT_LINES`` lines before it; its context is the preceding
    lines, whole lines only. Prose lines are left out: they measure little but noise on small models.
    """
    candidates = []
    for doc_index, text in enumerate(texts):
        lines = text.split("\n")
        quotes = 0  # triple quotes seen so far: odd inside a docstring
        for i, line in enumerate(lines[:-1]):  # the last piece has no newline after it
            opened = quotes % 2
            quotes += line.count('"""') + line.count("'''")
            in_docstring = opened or quotes % 2 or '"""' in line or "'''" in line
            if i >= MIN_CONTEXT_LINES and not in_docstring and _split_line(f"\n{lines[i - 1]}\n", line) is not None:
                candidates.append((doc_index, i))
    if n_prompts > len(candidates):
        raise EvalInputError(f"--completion-prompts {n_prompts}: the held-out text has only {len(candidates)} "
                             "usable code lines; ask for fewer or pass more --eval-data")  # fmt: skip
    prompts = []
    for k in range(n_prompts):
        doc_index, i = candidates[k * len(candidates) // n_prompts]
        lines = texts[doc_index].split("\n")
        start = i
        while start > 0 and sum(len(x) + 1 for x in lines[start - 1 : i]) <= max_context_chars:
            start -= 1
        prev = "".join(x + "\n" for x in lines[start:i])
        context, target = _split_line(prev, lines[i])
        prompts.append({"context": context, "target": target})
    return prompts


class _StopAtNewline(StoppingCriteria):
    """Stops once the last generated token holds a newline: greedy tokens before it do not change."""

    def __init__(self, newline_ids: torch.Tensor):
        super().__init__()
        self.newline_ids = newline_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.isin(input_ids[:, -1], self.newline_ids.to(input_ids.device))


def _newline_ids(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    ids = [i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def complete_lines(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[dict[str, str]],
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: bool = False,
    desc: str = "line completion",
) -> list[str]:
    """Greedy completion of each prompt's context, decoded without special tokens, cut at the first newline."""
    model.eval()
    device = next(model.parameters()).device
    stop = StoppingCriteriaList([_StopAtNewline(_newline_ids(tokenizer))])
    out = []
    for prompt in tqdm(prompts, desc=desc, disable=not progress):
        ids = tokenizer(prompt["context"], return_tensors="pt")["input_ids"].to(device)
        new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, stopping_criteria=stop,
                             pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1] :]  # fmt: skip
        out.append(tokenizer.decode(new, skip_special_tokens=True).split("\n")[0])
    return out


def exact_match(completions: list[str], prompts: list[dict[str, str]]) -> float:
    """Fraction of completions equal to their prompt's target (lm_eval's exact_match with default options)."""
    return sum(c == p["target"] for c, p in zip(completions, prompts, strict=True)) / len(prompts)


def line_completion_report(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[dict[str, str]],
    teacher: PreTrainedModel | None = None,
    progress: bool = False,
) -> dict:
    """Exact match of ``model`` and, with a teacher, the teacher's and how often both completions are the same."""
    mine = complete_lines(model, tokenizer, prompts, progress=progress, desc="line completion")
    report = {"prompts": len(prompts), "max_new_tokens": MAX_NEW_TOKENS,
              "exact_match": round(exact_match(mine, prompts), 4)}  # fmt: skip
    if teacher is not None:
        theirs = complete_lines(teacher, tokenizer, prompts, progress=progress, desc="teacher line completion")
        report["teacher_exact_match"] = round(exact_match(theirs, prompts), 4)
        report["same_as_teacher"] = round(sum(a == b for a, b in zip(mine, theirs, strict=True)) / len(prompts), 4)
    return report


def passkey_report(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    filler: torch.Tensor,
    lengths: list[int],
    trials: int,
    teacher: PreTrainedModel | None = None,
    progress: bool = False,
) -> dict:
    """Passkey accuracy per context length of ``model`` and, with a teacher, of the teacher."""
    report = {"depths": list(PASSKEY_DEPTHS), "trials": trials,
              "accuracy": passkey_accuracy(model, tokenizer, filler, lengths, trials, progress)}  # fmt: skip
    if teacher is not None:
        report["teacher_accuracy"] = passkey_accuracy(teacher, tokenizer, filler, lengths, trials, progress, "teacher")
    return report


def passkey_prompts(
    tokenizer: PreTrainedTokenizerBase, filler: torch.Tensor, length: int, trials: int, seed: int = 0
) -> list[tuple[torch.Tensor, str]]:
    """(input ids, key) per depth and trial: the key line spliced into held-out filler tokens [N].

    Prompt and answer fit in ``length``: the prompt has ``length - PASSKEY_NEW_TOKENS`` tokens.
    """
    rng = random.Random(seed * 1_000_003 + length)
    out = []
    for depth in PASSKEY_DEPTHS:
        for _ in range(trials):
            key = str(rng.randrange(10_000, 100_000))
            needle = tokenizer(_NEEDLE.format(key=key), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            question = tokenizer(_QUESTION, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            room = length - PASSKEY_NEW_TOKENS - needle.numel() - question.numel()
            if room < 1:
                need = needle.numel() + question.numel() + PASSKEY_NEW_TOKENS
                raise EvalInputError(f"--passkey-lengths {length}: too short for the key, question and answer "
                                     f"({need} tokens)")  # fmt: skip
            start = rng.randrange(max(1, filler.numel() - room))
            text = filler[start : start + room]
            if text.numel() < room:  # a short held-out text repeats
                text = filler.repeat(room // filler.numel() + 2)[start : start + room]
            at = round(depth * room)
            out.append((torch.cat([text[:at], needle, text[at:], question]), key))
    return out


@torch.no_grad()
def passkey_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    filler: torch.Tensor,
    lengths: list[int],
    trials: int = 2,
    progress: bool = False,
    desc: str = "passkey",
) -> dict[str, float]:
    """Accuracy per context length (str(length) -> fraction of depths x trials whose greedy answer is the key)."""
    model.eval()
    device = next(model.parameters()).device
    result = {}
    for length in lengths:
        cases = passkey_prompts(tokenizer, filler, length, trials)
        hits = 0
        for ids, key in tqdm(cases, desc=f"{desc} {length}", disable=not progress):
            ids = ids[None].to(device)
            new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=PASSKEY_NEW_TOKENS,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1] :]  # fmt: skip
            answer = re.match(r"\s*(\d+)", tokenizer.decode(new, skip_special_tokens=True))
            hits += bool(answer) and answer.group(1) == key
        result[str(length)] = round(hits / len(cases), 4)
    return result
