"""MQAR (multi-query associative recall, Zoology: Arora et al. 2023) on tiny hf_linattn models.

Every example starts with ``P`` key-value pairs ``k1 v1 k2 v2 ...``; every key is then queried once,
at a random (power-law spaced) position of the rest of the sequence, and the model must predict the
key's value at the query. Keys come from the lower half of the vocabulary, values from the upper half,
every other position holds token 0. Loss and accuracy count the answer positions only.

The models are ``LinAttnForCausalLM`` with 2 layers of one mixer: a mode (gla, gdn, rla, rdn) or
softmax attention ("full_attention"), so the benchmark measures the package's real layers.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hf_linattn.errors import InputError
from hf_linattn.evaluation.plots import pyplot, require_matplotlib, save_figure
from hf_linattn.kernels.modes import MODES
from hf_linattn.modeling import LinAttnConfig, LinAttnForCausalLM

SOFTMAX = "full_attention"
MIXERS = (*MODES, SOFTMAX)
IGNORE = -100  # labels of the non-answer positions (torch's cross-entropy ignore_index)


@dataclass(frozen=True)
class MqarSettings:
    """One MQAR sweep: every mixer x model dim x number of pairs x seed is one training run."""

    mixers: Sequence[str] = MIXERS
    dims: Sequence[int] = (64, 128)
    pairs: Sequence[int] = (4, 8)
    seeds: Sequence[int] = (0, 1)
    seq_len: int = 128
    vocab_size: int | None = None  # None: max(64, 4 x the largest pairs), see `vocab`
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    head_dim: int = 32
    test_examples: int = 256
    power_a: float = 0.01  # Zoology's power-law exponent of the query gaps: early gaps are the likeliest

    @property
    def vocab(self) -> int:
        """The vocabulary size used: a small one learns faster (fewer embeddings to sort out on a CPU budget)."""
        return self.vocab_size or max(64, 4 * max(self.pairs))

    def check(self) -> None:
        """Raise InputError for a sweep that cannot run (before any training starts)."""
        bad = [m for m in self.mixers if m not in MIXERS]
        if bad or not self.mixers:
            raise InputError(f"unknown mixer(s) {bad}; expected some of {', '.join(MIXERS)}")
        if not self.dims or not self.pairs or not self.seeds:
            raise InputError("MQAR needs at least one model dim, one number of pairs and one seed")
        for dim in self.dims:
            if dim < self.head_dim or dim % self.head_dim:
                raise InputError(f"model dim {dim} must be a positive multiple of the head dim {self.head_dim}")
        for p in self.pairs:
            check_layout(seq_len=self.seq_len, num_pairs=p, vocab_size=self.vocab)


def check_layout(*, seq_len: int, num_pairs: int, vocab_size: int) -> None:
    """Raise InputError unless ``num_pairs`` pairs and their queries fit ``seq_len`` and the vocabulary."""
    if num_pairs < 1:
        raise InputError(f"the number of key-value pairs must be >= 1; got {num_pairs}")
    if seq_len < 4 * num_pairs:
        raise InputError(
            f"{num_pairs} key-value pairs need a sequence of at least {4 * num_pairs} tokens (pairs, then a "
            f"query and its answer per pair); got --seq-len {seq_len}"
        )
    if vocab_size // 2 - 1 < num_pairs:
        raise InputError(f"{num_pairs} distinct keys need a vocabulary of at least {2 * num_pairs + 2} tokens")


def mqar_batch(
    batch: int, *, seq_len: int, num_pairs: int, vocab_size: int, generator: torch.Generator, power_a: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of MQAR examples: input ids [B, T] and labels [B, T], T = ``seq_len``.

    ``labels[b, t]`` is the value that the key ``input_ids[b, t]`` was paired with when t is a query
    position, ``IGNORE`` elsewhere (already shifted: the model predicts it from tokens 0..t).
    """
    check_layout(seq_len=seq_len, num_pairs=num_pairs, vocab_size=vocab_size)
    half = vocab_size // 2
    # distinct keys in [1, half) and distinct values in [half, vocab) per example, as Zoology draws them (0 is the
    # filler token); a random permutation per row, cut to num_pairs
    keys = torch.rand(batch, half - 1, generator=generator).argsort(dim=1)[:, :num_pairs] + 1
    values = torch.rand(batch, vocab_size - half, generator=generator).argsort(dim=1)[:, :num_pairs] + half
    context = 2 * num_pairs
    examples = torch.zeros(batch, seq_len + 1, dtype=torch.long)  # one more token: inputs and labels are shifted
    examples[:, 0:context:2], examples[:, 1:context:2] = keys, values
    # query slots: every other position after the context; slot gaps drawn without replacement from a power law
    slots = (seq_len + 1 - context) // 2
    weights = power_a * torch.arange(1, slots + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial(weights.expand(batch, -1), num_pairs, replacement=False, generator=generator)
    query_pos = context + 2 * gaps  # [B, P]: the key here, its value at the next position
    labels = torch.full((batch, seq_len + 1), IGNORE, dtype=torch.long)
    examples.scatter_(1, query_pos, keys)
    examples.scatter_(1, query_pos + 1, values)
    labels.scatter_(1, query_pos + 1, values)
    return examples[:, :-1].contiguous(), labels[:, 1:].contiguous()


def build_model(mixer: str, *, dim: int, head_dim: int, vocab_size: int, seq_len: int, seed: int) -> LinAttnForCausalLM:
    """A 2-layer ``LinAttnForCausalLM`` of one mixer, width ``dim`` (heads of ``head_dim``), MLP 2 x dim."""
    torch.manual_seed(seed)
    heads = dim // head_dim
    config = LinAttnConfig(
        vocab_size=vocab_size, hidden_size=dim, intermediate_size=2 * dim, num_attention_heads=heads,
        num_key_value_heads=heads, mixer_types=[mixer, mixer], max_position_embeddings=seq_len,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    return LinAttnForCausalLM(config)


def _answer_logits(model: LinAttnForCausalLM, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits [N, V] of the N answer positions only (the LM head over every position would cost most of a step)."""
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    return model.lm_head(hidden[mask])


@torch.no_grad()
def accuracy(model: LinAttnForCausalLM, input_ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 64) -> float:
    """Fraction of answer positions whose argmax prediction is the right value."""
    model.eval()
    right = total = 0
    for start in range(0, len(input_ids), batch_size):
        ids, lab = input_ids[start : start + batch_size], labels[start : start + batch_size]
        mask = lab != IGNORE
        right += (_answer_logits(model, ids, mask).argmax(-1) == lab[mask]).sum().item()
        total += mask.sum().item()
    return right / total


def train_one(mixer: str, *, dim: int, num_pairs: int, seed: int, settings: MqarSettings) -> dict[str, Any]:
    """Train one model on fresh MQAR batches (AdamW, linear warmup, cosine decay); return its test accuracy."""
    model = build_model(mixer, dim=dim, head_dim=settings.head_dim, vocab_size=settings.vocab,
                        seq_len=settings.seq_len, seed=seed)  # fmt: skip
    layout = {"seq_len": settings.seq_len, "num_pairs": num_pairs, "vocab_size": settings.vocab,
              "power_a": settings.power_a}  # fmt: skip
    # test examples from their own random stream (seed 10**6 + seed), apart from the training batches (seed)
    test_ids, test_labels = mqar_batch(settings.test_examples, generator=torch.Generator().manual_seed(10**6 + seed),
                                       **layout)  # fmt: skip
    train_gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.1)
    warmup = max(1, settings.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, settings.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start = time.perf_counter()
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(settings.steps):
        ids, labels = mqar_batch(settings.batch_size, generator=train_gen, **layout)
        mask = labels != IGNORE
        loss = torch.nn.functional.cross_entropy(_answer_logits(model, ids, mask), labels[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return {
        "mixer": mixer, "dim": dim, "pairs": num_pairs, "seed": seed,
        "accuracy": accuracy(model, test_ids, test_labels), "final_loss": loss.item(),
        "seconds": time.perf_counter() - start,
    }  # fmt: skip


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std of the accuracy over seeds, per (mixer, dim, pairs), in run order."""
    groups: dict[tuple, list[float]] = {}
    for r in runs:
        groups.setdefault((r["mixer"], r["dim"], r["pairs"]), []).append(r["accuracy"])
    rows = []
    for (mixer, dim, pairs), accs in groups.items():
        mean = sum(accs) / len(accs)
        std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else 0.0
        rows.append({"mixer": mixer, "dim": dim, "pairs": pairs, "mean": mean, "std": std, "seeds": len(accs)})
    return rows


def paper_claims(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """rdn vs gdn and rla vs gla (arXiv 2509.25223 claims >=): mean difference per cell and how many cells hold."""
    cells = {(r["mixer"], r["dim"], r["pairs"]): r for r in rows}
    claims = {}
    for residual, base in (("rdn", "gdn"), ("rla", "gla")):
        diffs = []
        for (mixer, dim, pairs), r in cells.items():
            other = cells.get((base, dim, pairs))
            if mixer == residual and other is not None:
                diffs.append({"dim": dim, "pairs": pairs, "difference": r["mean"] - other["mean"],
                              "pooled_std": math.sqrt((r["std"] ** 2 + other["std"] ** 2) / 2)})  # fmt: skip
        if diffs:
            claims[f"{residual}>={base}"] = {
                "cells": diffs, "cells_holding": sum(d["difference"] >= 0 for d in diffs), "cells_total": len(diffs),
                "mean_difference": sum(d["difference"] for d in diffs) / len(diffs),
            }  # fmt: skip
    return claims


def paper_claims_text(claims: dict[str, dict[str, Any]]) -> str:
    """One line per claim: in how many cells it holds and the mean difference in accuracy points."""
    return "\n".join(
        f"{name}: holds in {c['cells_holding']}/{c['cells_total']} cells, mean difference "
        f"{100 * c['mean_difference']:+.1f} points"
        for name, c in claims.items()
    )


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_mqar(
    settings: MqarSettings, *, progress: bool = True, threads: int | None = None, workers: int = 1
) -> dict[str, Any]:
    """Train every (mixer, dim, pairs, seed) of the sweep; returns the report (settings, summary, claims, runs).

    ``workers`` > 1 trains that many models at once in spawned processes with ``threads`` (default 1) torch
    threads each: on a few cores, tiny models train faster side by side than one at a time on several threads
    (OpenMP threads of tiny ops spend much of their time waiting, and far more when other jobs share the cores).
    """
    settings.check()
    grid = [(m, d, p, s) for d in settings.dims for p in settings.pairs
            for m in settings.mixers for s in settings.seeds]  # fmt: skip
    runs: list[dict[str, Any] | None] = [None] * len(grid)
    start = time.perf_counter()
    with tqdm(total=len(grid), desc="mqar", disable=not progress, dynamic_ncols=True, leave=False) as bar:
        if workers <= 1:
            if threads:
                torch.set_num_threads(threads)
            for i, (mixer, dim, pairs, seed) in enumerate(grid):
                bar.set_postfix_str(f"{mixer} d={dim} P={pairs} seed={seed}")
                runs[i] = train_one(mixer, dim=dim, num_pairs=pairs, seed=seed, settings=settings)
                bar.update(1)
        else:
            # spawn, not fork: a forked child would inherit torch's thread pools mid-state
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                     initargs=(threads or 1,)) as pool:  # fmt: skip
                # the widest models first, so that no slow run is left alone at the end
                order = sorted(range(len(grid)), key=lambda i: -grid[i][1])
                futures = {pool.submit(train_one, grid[i][0], dim=grid[i][1], num_pairs=grid[i][2], seed=grid[i][3],
                                       settings=settings): i for i in order}  # fmt: skip
                for future in as_completed(futures):
                    runs[futures[future]] = future.result()
                    bar.update(1)
    rows = summarize(runs)
    settings_dict = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}
    settings_dict["vocab_size"] = settings.vocab
    return {
        "settings": settings_dict, "summary": rows, "paper_claims": paper_claims(rows), "runs": runs,
        "wall_seconds": time.perf_counter() - start, "workers": workers,
        "torch_threads_per_worker": threads or 1 if workers > 1 else torch.get_num_threads(),
    }  # fmt: skip


def table_title(settings: MqarSettings) -> str:
    """What the table's cells are, and the chance level (1 / the number of values)."""
    return f"MQAR test accuracy (%), mean ± std over {len(settings.seeds)} seed(s); chance {200 / settings.vocab:.1f}%"


def format_summary(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table: one row per (dim, pairs), one column per mixer, cells 'mean ± std' accuracy in %."""
    mixers = list(dict.fromkeys(r["mixer"] for r in rows))
    cells = {(r["mixer"], r["dim"], r["pairs"]): r for r in rows}
    keys = sorted({(r["dim"], r["pairs"]) for r in rows})
    head = ["dim", "pairs", *[("softmax" if m == SOFTMAX else m) for m in mixers]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for dim, pairs in keys:
        vals = []
        for m in mixers:
            r = cells.get((m, dim, pairs))
            vals.append(f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}" if r else "-")
        lines.append("| " + " | ".join([str(dim), str(pairs), *vals]) + " |")
    return "\n".join(lines)


def plot_mqar(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Accuracy vs pairs, one panel per model dim, one line per mixer with a ±std band; a small PNG."""
    plt = pyplot()

    dims = sorted({r["dim"] for r in rows})
    mixers = list(dict.fromkeys(r["mixer"] for r in rows))
    fig, axes = plt.subplots(1, len(dims), figsize=(4 * len(dims), 3.2), sharey=True, squeeze=False)
    for ax, dim in zip(axes[0], dims):
        for mixer in mixers:
            pts = sorted((r["pairs"], r["mean"], r["std"]) for r in rows if r["mixer"] == mixer and r["dim"] == dim)
            x = [p[0] for p in pts]
            mean = [p[1] for p in pts]
            ax.plot(x, mean, marker="o", label="softmax" if mixer == SOFTMAX else mixer,
                    linestyle="--" if mixer == SOFTMAX else "-")  # fmt: skip
            ax.fill_between(x, [p[1] - p[2] for p in pts], [p[1] + p[2] for p in pts], alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("key-value pairs")
        ax.set_title(f"model dim {dim}")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy")
    axes[0][-1].legend(fontsize=8)
    return save_figure(fig, path)


def mqar_settings_from_args(args: Any) -> MqarSettings:
    """Settings from the flags of ``hf_linattn.cli.add_mqar_options`` (``--seeds N`` means seeds 0..N-1)."""
    return MqarSettings(
        mixers=tuple(args.mixers), dims=tuple(args.dims), pairs=tuple(args.pairs), seeds=tuple(range(args.seeds)),
        seq_len=args.seq_len, vocab_size=args.vocab_size, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
    )  # fmt: skip


def run_and_report(
    settings: MqarSettings,
    *,
    json_path: str | Path,
    progress: bool = True,
    threads: int | None = None,
    workers: int = 1,
) -> tuple[dict[str, Any], Path]:
    """Run the sweep, print the table, write the JSON report and the PNG beside it (same name, .png)."""
    from hf_linattn.fileio import atomic_write_json

    require_matplotlib()
    report = run_mqar(settings, progress=progress, threads=threads, workers=workers)
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(json_path, {"benchmark": "mqar", **report})
    png = plot_mqar(report["summary"], json_path.with_suffix(".png"))
    print(table_title(settings))
    print(format_summary(report["summary"]))
    print(paper_claims_text(report["paper_claims"]))
    return report, png
