"""Conversion ablations on one base model, equal training budget per row (``hf-linattn bench ablations``).

Each group varies one setting of the reference recipe (rdn, 1 softmax layer in 4 chosen by stage-1
error, residual clip 1, no rotary in the linear layers, KL loss) and keeps the others:

- ``mode``: pure gla / gdn / rla / rdn;
- ``softmax``: pure rdn vs 1 vs 2 softmax layers in 8 (scaled to the base's depth);
- ``selection``: kept layers by stage-1 error vs evenly spaced vs KL-guided (one short LoRA run per layer);
- ``clip``: residual clip 0.5 / 1 / 2;
- ``rotary``: rotary on q/k in the linear layers off / on;
- ``loss``: stage-2 KL vs CE;
- ``gates``: decay gates from their random init vs pooled from the teacher's keys (Liger);
- ``stage1``: what attention transfer trains: the new pieces, also q/k, also q/k/v/o (RADLADS);
- ``stage2``: what stage 2 trains: LoRA on q/k/v/o, plus LoRA on the MLP, plus the new mixer pieces in full;
- ``lr``: the default peak learning rates (stage 1 / stage 2) vs LoLCATs-like 1e-2 / 1e-3;
- ``schedule``: both stages' learning rate cosine-decayed (the default) vs constant.

Every row is one ``convert`` into ``runs/<row>`` beside the JSON report, so an interrupted sweep
resumes (finished rows are read back, unfinished ones resume from their last save), and a row
shared by groups (the reference) is converted once. A row reports the held-out perplexity ratio,
greedy agreement and line exact match (the generation metric).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from hf_linattn.conversion.pipeline import ConversionRecipe
from hf_linattn.errors import InputError
from hf_linattn.evaluation.plots import pyplot, require_matplotlib, save_figure

_DEFAULT = ConversionRecipe()
_STAGE1_LABELS = {"new": "new pieces", "qk": "+ q/k", "all": "+ q/k/v/o"}  # keys: ATTENTION_TRANSFER_PARAMS

# group -> row label -> recipe fields that differ from the reference (``None`` softmax counts are "1 in 4")
GROUPS: dict[str, dict[str, dict[str, Any]]] = {
    "mode": {m: {"mode": m, "keep_softmax": 0} for m in ("gla", "gdn", "rla", "rdn")},
    "softmax": {"pure": {"keep_softmax": 0}, "1 in 8": {"keep_softmax": "eighth"}, "1 in 4": {}},
    "selection": {"stage-1 error": {}, "even": {"softmax_selection": "even"}, "KL-guided": {"softmax_selection": "kl"}},
    "clip": {"0.5": {"residual_clip": 0.5}, "1": {}, "2": {"residual_clip": 2.0}},
    "rotary": {"off": {}, "on": {"linear_use_rotary": True}},
    "loss": {"KL": {}, "CE": {"loss": "ce"}},
    "gates": {"random": {}, "from keys": {"gate_init": "keys"}},
    "stage1": {
        label: {} if value == _DEFAULT.attention_transfer_params else {"attention_transfer_params": value}
        for value, label in _STAGE1_LABELS.items()
    },
    "stage2": {"LoRA q/k/v/o": {}, "+ MLP LoRA": {"lora_mlp": True}, "+ mixers in full": {"train_mixers": True}},
    "lr": {
        f"{_DEFAULT.attention_transfer_lr:g} / {_DEFAULT.lora_lr:g}": {},
        "1e-2 / 1e-3": {"attention_transfer_lr": 1e-2, "lora_lr": 1e-3},
    },
    "schedule": {_DEFAULT.lr_schedule: {}, "constant": {"lr_schedule": "constant"}},
}
REFERENCE: dict[str, Any] = {"mode": "rdn", "keep_softmax": "quarter", "softmax_selection": "error"}


def resolve_keep(value: int | str, num_layers: int) -> int:
    """A softmax-layer count: an int as is, "quarter" = 1 in 4, "eighth" = 1 in 8 (at least 1)."""
    if isinstance(value, int):
        return value
    return max(1, num_layers // {"quarter": 4, "eighth": 8}[value])


def row_recipes(
    groups: Sequence[str], num_layers: int, budget: dict[str, Any]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, str]]]:
    """The distinct rows of ``groups`` ({slug: recipe fields}) and the table ({group: {label: slug}}).

    budget: the fields every row shares (steps, batch, sequence length, evaluation sizes, seed, base).
    """
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        raise InputError(f"unknown ablation group(s) {unknown}; expected some of {', '.join(GROUPS)}")
    rows: dict[str, dict[str, Any]] = {}
    table: dict[str, dict[str, str]] = {}
    for group in groups:
        table[group] = {}
        for label, change in GROUPS[group].items():
            fields = {**REFERENCE, **change, **budget}
            fields["keep_softmax"] = resolve_keep(fields["keep_softmax"], num_layers)
            table[group][label] = slug(fields)
            rows.setdefault(table[group][label], fields)
    return rows, table


def slug(fields: dict[str, Any]) -> str:
    """A folder name that identifies a recipe by what ablations change."""
    parts = [fields["mode"], f"keep{fields['keep_softmax']}"]
    if fields["keep_softmax"]:
        parts.append(fields["softmax_selection"])
    parts += [f"clip{fields.get('residual_clip', 1.0):g}", "rope" if fields.get("linear_use_rotary") else "norope",
              fields.get("loss", "kl")]  # fmt: skip
    if fields.get("gate_init", "random") != "random":
        parts.append(f"gates-{fields['gate_init']}")
    stage1 = fields.get("attention_transfer_params", _DEFAULT.attention_transfer_params)
    parts += [f"at-{stage1}"] * (stage1 != _DEFAULT.attention_transfer_params)
    parts += ["mlp"] * bool(fields.get("lora_mlp")) + ["mixers"] * bool(fields.get("train_mixers"))
    for name, short in (("attention_transfer_lr", "atlr"), ("lora_lr", "lr"), ("lr_schedule", "")):
        if fields.get(name, getattr(_DEFAULT, name)) != getattr(_DEFAULT, name):
            parts.append(f"{short}{fields[name]:g}" if short else fields[name])
    return re.sub(r"[^A-Za-z0-9.+-]", "_", "-".join(parts))


def run_ablations(
    groups: Sequence[str],
    *,
    runs_dir: str | Path,
    budget: dict[str, Any],
    progress: bool = True,
) -> dict[str, Any]:
    """Convert every distinct row of ``groups`` into ``runs_dir/<slug>`` (resuming), return the report dict."""
    from transformers import AutoConfig

    from hf_linattn.conversion.pipeline import convert, resolve_base

    base = budget.get("base", ConversionRecipe.base)
    num_layers = AutoConfig.from_pretrained(resolve_base(base)).num_hidden_layers
    rows, table = row_recipes(groups, num_layers, budget)
    runs_dir = Path(runs_dir)
    results: dict[str, dict[str, Any]] = {}
    for name, fields in tqdm(rows.items(), desc="ablations", disable=not progress):
        start = time.time()
        report = convert(runs_dir / name, ConversionRecipe(**fields), progress=progress)
        results[name] = summarize_report(report, minutes=round((time.time() - start) / 60, 2))
    return {"budget": budget, "num_layers": num_layers, "groups": table, "rows": results}


def summarize_report(report: dict[str, Any], minutes: float) -> dict[str, Any]:
    """The figures of one conversion report that the ablation table shows."""
    lines = report.get("line_completion") or {}
    recipe = report["recipe"]
    extra_steps = recipe["selection_steps"] * report["num_layers"] if report.get("softmax_selection", {}).get(
        "strategy") == "kl" else 0  # fmt: skip
    return {
        "teacher_perplexity": report["teacher_perplexity"],
        "student_perplexity": report["student_perplexity"],
        "ratio": report["perplexity_ratio"],
        "token_agreement": report["greedy_agreement"]["token_agreement"],
        "line_exact_match": lines.get("exact_match"),
        "teacher_line_exact_match": lines.get("teacher_exact_match"),
        "kept_softmax_layers": report["kept_softmax_layers"],
        "selection_lora_steps": extra_steps,
        "minutes": minutes if report.get("seconds") is None else round(report["seconds"] / 60, 2),
    }


def format_table(report: dict[str, Any]) -> str:
    """Markdown: one row per (group, label)."""
    head = ["group", "row", "softmax kept", "ppl / teacher", "greedy agreement", "line exact match", "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for group, labels in report["groups"].items():
        for label, name in labels.items():
            r = report["rows"][name]
            exact = "-" if r["line_exact_match"] is None else f"{100 * r['line_exact_match']:.1f}%"
            kept = ", ".join(map(str, r["kept_softmax_layers"])) or "-"
            extra = f" (+{r['selection_lora_steps']} selection steps)" if r["selection_lora_steps"] else ""
            lines.append(f"| {group} | {label}{extra} | {kept} | {r['ratio']:.3f} | "
                         f"{100 * r['token_agreement']:.0f}% | {exact} | {r['minutes']} |")  # fmt: skip
    return "\n".join(lines)


def plot_ablations(report: dict[str, Any], path: str | Path) -> Path:
    """One panel per group: the perplexity ratio of each row (bars), greedy agreement as a marker."""
    plt = pyplot()

    groups = report["groups"]
    fig, axes = plt.subplots(1, len(groups), figsize=(2.6 * len(groups), 3.2), squeeze=False)
    for ax, (group, labels) in zip(axes[0], groups.items()):
        rows = [report["rows"][name] for name in labels.values()]
        ax.bar(range(len(rows)), [r["ratio"] for r in rows], color="tab:blue", alpha=0.8)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(rows)), list(labels), rotation=30, fontsize=8)
        ax.set_title(group, fontsize=9)
        ax.set_ylim(min(1.0, *[r["ratio"] for r in rows]) * 0.95, max(r["ratio"] for r in rows) * 1.05)
        agree = ax.twinx()
        agree.plot(range(len(rows)), [r["token_agreement"] for r in rows], "o", color="tab:orange")
        agree.set_ylim(0, 1)
        agree.tick_params(labelsize=7)
    axes[0][0].set_ylabel("held-out ppl / teacher (bars)")
    fig.text(0.995, 0.5, "greedy agreement (dots)", rotation=90, va="center", ha="right", fontsize=8)
    return save_figure(fig, path, rect=(0, 0, 0.98, 1))


def run_and_report(
    groups: Sequence[str], *, json_path: str | Path, budget: dict[str, Any], progress: bool = True
) -> tuple[dict[str, Any], Path]:
    """Run the ablations (conversions under ``<json stem>_runs/``), print the table, write JSON + PNG."""
    from hf_linattn.fileio import atomic_write_json

    require_matplotlib()
    json_path = Path(json_path)
    runs_dir = json_path.with_name(json_path.stem + "_runs")
    start = time.time()
    report = run_ablations(groups, runs_dir=runs_dir, budget=budget, progress=progress)
    report = {"benchmark": "ablations", **report, "wall_seconds": round(time.time() - start, 1),
              "runs_dir": str(runs_dir)}  # fmt: skip
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(json_path, report)
    png = plot_ablations(report, json_path.with_suffix(".png"))
    print(format_table(report))
    return report, png


__all__ = ["GROUPS", "REFERENCE", "format_table", "plot_ablations", "row_recipes", "run_ablations", "run_and_report"]
