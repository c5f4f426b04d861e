"""Long context vs length for several models on one tokenizer (``hf-linattn bench long-context``).

Per model and context length T:

- **held-out perplexity of the last quarter of T-token windows**: how well the model uses (or
  survives) a context of T tokens; a softmax model trained at 512 tokens degrades past it as rotary
  positions leave the trained range, a recurrent state does not grow;
- **passkey accuracy**: ``PASSKEY = <5 digits>`` hidden at 10%, 50% and 90% of T tokens of held-out
  code, the greedy answer to ``assert PASSKEY ==`` must be the key (``generation_eval``).

Models are folders or Hub ids (ours load with trust_remote_code); ``embedded-teacher`` names the
embedded teacher. All must share the first model's tokenizer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from hf_linattn.evaluation.plots import pyplot, require_matplotlib, save_figure


@torch.no_grad()
def tail_perplexity(model: PreTrainedModel, tokens: torch.Tensor, length: int, windows: int) -> float:
    """exp(mean NLL) of the last quarter of positions of up to ``windows`` disjoint ``length``-windows of tokens [N]."""
    count = min(windows, tokens.numel() // length)
    if count < 1:
        raise ValueError(f"{tokens.numel()} held-out tokens fill no window of {length}")
    rows = tokens[: count * length].view(count, length).to(next(model.parameters()).device)
    start = length - length // 4 - 1  # logits at start.. predict the last quarter's tokens
    total = 0.0
    for row in rows:
        logits = model(input_ids=row[None], use_cache=False).logits[0, start:-1].float()
        total += F.cross_entropy(logits, row[start + 1 :], reduction="sum").item()
    return math.exp(total / (count * (length - 1 - start)))


def run_long_context(
    models: Sequence[str],
    *,
    lengths: Sequence[int],
    windows: int = 4,
    passkey_trials: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure every model at every length; returns {"lengths", "models": {name: {"perplexity", "passkey"}}}."""
    from hf_linattn.assets import heldout_texts
    from hf_linattn.conversion.data import token_stream
    from hf_linattn.conversion.generation_eval import passkey_accuracy
    from hf_linattn.conversion.loading import check_same_tokenizer, load_causal_lm, load_tokenizer, resolve_source
    from hf_linattn.conversion.pipeline import resolve_base

    paths = {name: resolve_base(name) if name == "embedded-teacher" else resolve_source(name, "model")
             for name in models}  # fmt: skip
    tokenizer = load_tokenizer(str(paths[models[0]]), "save the tokenizer into the model folder")
    for name in models[1:]:
        check_same_tokenizer(tokenizer, load_tokenizer(str(paths[name]), "save the tokenizer into the model folder"),
                             f"{models[0]} vs {name}")  # fmt: skip
    held = token_stream(tokenizer, heldout_texts(), windows * max(lengths), False, "tokenizing held-out")
    results: dict[str, Any] = {}
    for name in tqdm(models, desc="long context", disable=not progress):
        model = load_causal_lm(str(paths[name]), trust_remote_code=True).eval()
        start = time.time()
        results[name] = {
            "perplexity": {str(t): round(tail_perplexity(model, held, t, windows), 4) for t in lengths},
            "passkey": passkey_accuracy(model, tokenizer, held, list(lengths), passkey_trials, progress, name),
            "seconds": 0.0,
        }
        results[name]["seconds"] = round(time.time() - start, 1)
    return {"lengths": list(lengths), "windows": windows, "passkey_trials": passkey_trials, "models": results}


def format_table(report: dict[str, Any]) -> str:
    """Markdown: one row per model, tail perplexity and passkey accuracy per length."""
    lengths = [str(t) for t in report["lengths"]]
    head = ["model", *[f"ppl @ {t}" for t in lengths], *[f"passkey @ {t}" for t in lengths]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, r in report["models"].items():
        cells = [f"{r['perplexity'][t]:.2f}" for t in lengths] + [f"{100 * r['passkey'][t]:.0f}%" for t in lengths]
        lines.append("| " + " | ".join([Path(name).name or name, *cells]) + " |")
    return "\n".join(lines)


def plot_long_context(report: dict[str, Any], path: str | Path) -> Path:
    """Two panels vs context length: tail perplexity (log scale) and passkey accuracy, one line per model."""
    plt = pyplot()

    lengths = report["lengths"]
    fig, (ppl, key) = plt.subplots(1, 2, figsize=(8, 3.2))
    for name, r in report["models"].items():
        label = Path(name).name or name
        ppl.plot(lengths, [r["perplexity"][str(t)] for t in lengths], marker="o", label=label)
        key.plot(lengths, [r["passkey"][str(t)] for t in lengths], marker="o", label=label)
    for ax, title in ((ppl, "held-out ppl, last quarter of the window"), (key, "passkey accuracy")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    ppl.set_yscale("log")
    key.set_ylim(-0.02, 1.02)
    key.legend(fontsize=7)
    return save_figure(fig, path)


def run_and_report(
    models: Sequence[str], *, json_path: str | Path, lengths: Sequence[int], windows: int, passkey_trials: int,
    progress: bool = True,
) -> tuple[dict[str, Any], Path]:  # fmt: skip
    """Run, print the table, write the JSON report and the PNG beside it."""
    from hf_linattn.fileio import atomic_write_json

    require_matplotlib()
    start = time.time()
    report = run_long_context(models, lengths=lengths, windows=windows, passkey_trials=passkey_trials,
                              progress=progress)  # fmt: skip
    report = {"benchmark": "long-context", **report, "wall_seconds": round(time.time() - start, 1)}
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(json_path, report)
    png = plot_long_context(report, json_path.with_suffix(".png"))
    print(format_table(report))
    return report, png


__all__ = ["format_table", "plot_long_context", "run_and_report", "run_long_context", "tail_perplexity"]
