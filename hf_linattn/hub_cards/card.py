"""The model card of a converted checkpoint, rendered from its conversion report."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
MODE_NAMES = {
    "gla": "gated linear attention",
    "gdn": "gated delta rule",
    "rla": "Residual Linear Attention, arXiv 2509.25223",
    "rdn": "Residual Delta Net, arXiv 2509.25223",
}


def render_model_card(report: dict, repo_id: str | None = None) -> ModelCard:
    """A ModelCard (YAML metadata + markdown) for a conversion ``report`` as written by ``convert``."""
    recipe = report["recipe"]
    base = recipe["base"]
    errors = report["stage1_layer_errors"]
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license="apache-2.0",
        base_model=None if base == "embedded-teacher" or Path(base).exists() else base,  # hub ids only
        tags=["hf_linattn", "linear-attention", recipe["mode"], "custom_code", "conversion"],
    )
    kept = report["kept_softmax_layers"]
    completion = report.get("line_completion")  # absent from reports written before it existed
    lines = completion and {
        "prompts": completion["prompts"], "max_new_tokens": completion["max_new_tokens"],
        "student": f"{100 * completion['exact_match']:.1f}%",
        "teacher": f"{100 * completion['teacher_exact_match']:.1f}%",
        "same": f"{100 * completion['same_as_teacher']:.1f}%",
    }  # fmt: skip
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATE),
        title=repo_id.split("/")[-1] if repo_id else f"{recipe['mode']} conversion of {base}",
        base=base,
        repo=repo_id or "path/to/this/folder",
        mode=recipe["mode"],
        mode_name=MODE_NAMES[recipe["mode"]],
        n_linear=report["num_layers"] - len(kept),
        num_layers=report["num_layers"],
        kept=", ".join(map(str, kept)),
        explicit=recipe["keep_softmax_layers"] is not None,
        heldout_tokens=report["heldout_tokens"],
        teacher_ppl=f"{report['teacher_perplexity']:.3f}",
        student_ppl=f"{report['student_perplexity']:.3f}",
        ratio=f"{report['perplexity_ratio']:.3f}",
        agreement=f"{100 * report['greedy_agreement']['token_agreement']:.1f}",
        prefix=f"{report['greedy_agreement']['mean_agreeing_prefix']:.1f}",
        lines=lines,
        layer_types=", ".join(report["layer_types"]),
        recipe=recipe,
        tokens=report["train_tokens_seen"],
        error_header=" | ".join(str(i) for i in range(len(errors))),
        error_rule="---|" * len(errors),
        error_row=" | ".join(f"{e:.4f}" for e in errors),
    )


def write_model_card(folder: str | Path, report: dict, repo_id: str | None = None) -> Path:
    """Write README.md (the card) into ``folder``; returns its path."""
    path = Path(folder) / "README.md"
    render_model_card(report, repo_id).save(str(path))
    return path
