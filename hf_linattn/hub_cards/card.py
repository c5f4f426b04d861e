"""The model card of a converted checkpoint: huggingface_hub's ``ModelCard`` from the Jinja template
``templates/model_card.md``, filled from the conversion report (and, when there are, the eval and decode reports).

The metadata (``ModelCardData``) carries ``base_model`` / ``base_model_relation`` where the base has a Hub id,
``library_name``, ``pipeline_tag``, tags, the license and ``model-index`` with the evaluation results
(``EvalResult``); ``ModelCard.load`` reads it back unchanged.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
MODE_NAMES = {
    "gla": "gated linear attention",
    "gdn": "gated delta rule",
    "rla": "Residual Linear Attention, arXiv 2509.25223",
    "rdn": "Residual Delta Net, arXiv 2509.25223",
}
DEFAULT_EVAL = "held-out Python standard library source (hf_linattn's heldout.txt)"
REPO_PLACEHOLDER = "OWNER/NAME"


def _hub_id(base: str) -> str | None:
    """``base`` when it is a Hub id (owner/name, not a local path), else None."""
    if base == "embedded-teacher" or Path(base).exists() or base.startswith((".", "/", "~")):
        return None
    return base if base.count("/") == 1 else None


def _bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def eval_results(report: dict) -> list[EvalResult]:
    """The model-index entries of a conversion report: perplexity, greedy agreement, line exact match."""
    custom = report["recipe"].get("eval_data")
    dataset = dict(
        task_type="text-generation", task_name="Causal language modeling",
        dataset_type="local-text" if custom else "python-stdlib-heldout",
        dataset_name=f"held-out text ({', '.join(Path(p).name for p in custom)})" if custom else DEFAULT_EVAL,
    )  # fmt: skip
    agreement = report["greedy_agreement"]["token_agreement"]
    results = [
        EvalResult(**dataset, metric_type="perplexity", metric_value=round(report["student_perplexity"], 4),
                   metric_name="perplexity"),
        EvalResult(**dataset, metric_type="accuracy", metric_value=round(agreement, 4),
                   metric_name="greedy token agreement with the teacher"),
    ]  # fmt: skip
    if "line_completion" in report:
        results.append(EvalResult(**dataset, metric_type="exact_match",
                                  metric_value=round(report["line_completion"]["exact_match"], 4),
                                  metric_name="line completion exact match"))  # fmt: skip
    return results


def render_model_card(
    report: dict,
    repo_id: str | None = None,
    *,
    eval_report: dict | None = None,
    decode: dict | None = None,
    plot: str | None = None,
    license: str | None = None,
    license_source: str = "the base model's license was not looked up",
) -> ModelCard:
    """A ModelCard (YAML metadata + markdown) for a conversion ``report`` as written by ``convert``.

    ``eval_report``: ``hf-linattn eval``'s report (passkey rows); ``decode``: a decode benchmark
    (``decode_bench.measure_decoding``); ``plot``: the layer-error PNG's file name in the repo; ``license`` is
    the base's (None: unknown, ``license_source`` says why).
    """
    recipe = report["recipe"]
    base = recipe["base"]
    hub_base = _hub_id(base)
    name = repo_id.split("/")[-1] if repo_id else f"{recipe['mode']}-conversion"
    kept = report["kept_softmax_layers"]
    data = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation", license=license,
        base_model=hub_base, base_model_relation="finetune" if hub_base else None,
        tags=["hf_linattn", "linear-attention", recipe["mode"], *(["hybrid"] if kept else []), "custom_code",
              "conversion", "lookahead-decoding"],
        model_name=name, eval_results=eval_results(report),
    )  # fmt: skip
    completion = report.get("line_completion")  # absent from reports written before it existed
    lines = completion and {
        "prompts": completion["prompts"], "max_new_tokens": completion["max_new_tokens"],
        "student": f"{100 * completion['exact_match']:.1f}%",
        "teacher": f"{100 * completion['teacher_exact_match']:.1f}%",
        "same": f"{100 * completion['same_as_teacher']:.1f}%",
    }  # fmt: skip
    passkey = (eval_report or {}).get("passkey") or {}
    passkey_rows = [
        {"length": length, "student": f"{100 * acc:.0f}%",
         "teacher": f"{100 * passkey['teacher_accuracy'][length]:.0f}%" if length in passkey.get("teacher_accuracy", {})
         else "-"}
        for length, acc in passkey.get("accuracy", {}).items()
    ]  # fmt: skip
    if decode:
        rows = [{**row, "student_cache": _bytes(row["student_cache_bytes"]),
                 "teacher_cache": _bytes(row["teacher_cache_bytes"])} for row in decode["rows"]]  # fmt: skip
        decode = {**decode, "rows": rows}
    plan = zip(report["layer_types"], report["stage1_layer_errors"])
    layers = [{"index": i, "type": t, "error": f"{e:.4f}"} for i, (t, e) in enumerate(plan)]
    custom_eval, data_files = recipe.get("eval_data"), recipe.get("data")
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATE),
        title=name,
        base_text=f"[`{hub_base}`](https://huggingface.co/{hub_base})" if hub_base
        else "hf_linattn's embedded teacher (a small Llama trained on the Python standard library)"
        if base == "embedded-teacher" else f"a local checkpoint (`{Path(base).name}`)",
        repo=repo_id or REPO_PLACEHOLDER,
        mode=recipe["mode"],
        mode_name=MODE_NAMES[recipe["mode"]],
        n_linear=report["num_layers"] - len(kept),
        num_layers=report["num_layers"],
        kept=", ".join(map(str, kept)),
        kept_count=len(kept),
        explicit=recipe["keep_softmax_layers"] is not None,
        selection=recipe.get("softmax_selection", "error"),  # absent from reports written before it existed
        layers=layers,
        plot=plot,
        recipe=recipe,
        tokens=report["train_tokens_seen"],
        train_data=", ".join(f"`{Path(p).name}`" for p in data_files) if data_files
        else "the Python standard library source (1 file in 16 held out)",
        eval_data=f"held-out text ({', '.join(Path(p).name for p in custom_eval)})" if custom_eval else DEFAULT_EVAL,
        heldout_tokens=report["heldout_tokens"],
        teacher_ppl=f"{report['teacher_perplexity']:.3f}",
        student_ppl=f"{report['student_perplexity']:.3f}",
        ratio=f"{report['perplexity_ratio']:.3f}",
        agreement=f"{100 * report['greedy_agreement']['token_agreement']:.1f}",
        prefix=f"{report['greedy_agreement']['mean_agreeing_prefix']:.1f}",
        lines=lines,
        passkey=passkey_rows,
        decode=decode,
        license=license,
        license_source=license_source,
    )  # fmt: skip


def write_model_card(folder: str | Path, report: dict, repo_id: str | None = None) -> Path:
    """Write README.md (the card) into ``folder`` (the license read from the base when it can be); returns its path."""
    from .export import base_license

    license_, source = base_license(report["recipe"]["base"])
    path = Path(folder) / "README.md"
    render_model_card(report, repo_id, license=license_, license_source=source).save(str(path))
    return path
