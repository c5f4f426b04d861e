"""A converted checkpoint as a complete Hub model repo: ``hf-linattn export DIR OUT``, and what ``push`` uploads.

``export_repo`` writes into ``OUT``:

- the safetensors weights, sharded above ``max_shard_size`` (with ``model.safetensors.index.json``);
- ``config.json`` with ``auto_map`` and the flat remote code (modeling files and the Triton kernels;
  ``hf_linattn.modeling.export``), which imports only torch, transformers, the standard library and triton;
- the tokenizer and ``generation_config.json``;
- ``custom_generate/generate.py``: lookahead decoding through ``generate(custom_generate=repo_id)``;
- ``conversion_report.json`` (and ``eval_report.json``, ``decode_benchmark.json`` when there are);
- ``layer_errors.png`` (when matplotlib imports) and the model card ``README.md``.

Everything is built in ``OUT.partial`` and renamed to ``OUT`` at the end, so ``OUT`` is never half-written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hf_linattn.errors import InputError, OutputFolderError
from hf_linattn.fileio import atomic_write_json, read_json_state

from .decode_bench import BENCH_NAME

REPORT_NAME = "conversion_report.json"  # written by hf_linattn.conversion (not imported: it loads torch)
EVAL_NAME = "eval_report.json"
PLOT_NAME = "layer_errors.png"
DEFAULT_MAX_SHARD_SIZE = "5GB"


class IncompleteCheckpointError(InputError, FileNotFoundError):
    """A folder cannot be exported or pushed: something a trust_remote_code user needs is missing."""


def check_source(folder: Path) -> None:
    """Raise IncompleteCheckpointError unless ``folder`` holds a saved hf_linattn checkpoint with its tokenizer."""
    if not folder.is_dir():
        raise IncompleteCheckpointError(f"{folder}: no such folder")
    missing = [name for name in ("config.json", "tokenizer_config.json") if not (folder / name).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if not (folder / REPORT_NAME).is_file() and not (folder / "README.md").is_file():
        missing.append(f"{REPORT_NAME} (or a README.md model card)")
    if missing:
        raise IncompleteCheckpointError(f"{folder}: missing {', '.join(missing)}; export takes a converted checkpoint")
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type != "hf_linattn":
        raise IncompleteCheckpointError(f"{folder}/config.json: model_type {model_type!r} is not an hf_linattn "
                                        "checkpoint (hf_linattn); convert it first")  # fmt: skip


def _check_output(source: Path, output: Path, overwrite: bool) -> None:
    src, out = source.resolve(), output.resolve()
    if out == src or out in src.parents or src in out.parents:
        raise OutputFolderError(f"export output {output} is, holds or is inside the source {source}; choose another")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputFolderError(f"export output {output} exists and is not empty; pass --overwrite to replace it")


def plot_layer_errors(errors: list[float], kept: list[int], path: Path) -> bool:
    """A small bar chart of the per-layer stage-1 errors (kept softmax layers marked); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5, 2.6), dpi=100)
    colors = ["tab:orange" if i in kept else "tab:blue" for i in range(len(errors))]
    ax.bar(range(len(errors)), errors, color=colors)
    ax.set_xlabel("layer")
    ax.set_ylabel("stage-1 error")
    ax.set_xticks(range(len(errors)))
    ax.set_title("orange: kept as softmax attention", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return True


def base_license(base: str) -> tuple[str | None, str]:
    """(license, where it was read) of a conversion's base: the embedded teacher is ours (apache-2.0); a local folder
    or Hub id gives its card's ``license`` when it can be read (a Hub id needs the network); else (None, why)."""
    if base == "embedded-teacher":
        return "apache-2.0", "the embedded teacher of hf_linattn"
    from huggingface_hub import ModelCard

    local = Path(base)
    if local.exists() and not (local / "README.md").is_file():
        return None, f"the base folder {base} has no README.md"
    try:
        card = ModelCard.load(str(local / "README.md") if local.exists() else base)
    except Exception as err:  # network, offline mode, a missing or malformed card: the license stays unknown
        return None, f"the card of {base} could not be read ({type(err).__name__})"
    license_ = getattr(card.data, "license", None)
    return (str(license_), f"the card of {base}") if license_ else (None, f"the card of {base} names no license")


def export_repo(
    source: str | Path,
    output: str | Path,
    *,
    repo_id: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    bench: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the Hub model repo of the converted checkpoint ``source`` into ``output``; returns ``output``.

    ``repo_id`` names the repo in the card's code (a placeholder when None); ``bench`` measures decode speed and
    memory against the teacher (else an earlier ``decode_benchmark.json`` in ``source`` is used, if any).
    """
    source, output = Path(source), Path(output)
    check_source(source)
    _check_output(source, output, overwrite)
    build = output.with_name(output.name + ".partial")
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    try:
        _write_repo(source, build, repo_id=repo_id, max_shard_size=max_shard_size, bench=bench)
        if output.exists():
            shutil.rmtree(output)
        build.rename(output)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return output


def _write_repo(source: Path, build: Path, *, repo_id: str | None, max_shard_size: int | str, bench: bool) -> None:
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from hf_linattn.generation import CUSTOM_GENERATE_DIR
    from hf_linattn.modeling import LinAttnForCausalLM

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # a re-save of local weights: seconds, not worth a bar
    try:
        model = LinAttnForCausalLM.from_pretrained(source, dtype="auto")
        model.save_pretrained(build, max_shard_size=max_shard_size)
        del model
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    AutoTokenizer.from_pretrained(source).save_pretrained(build)
    (build / "custom_generate").mkdir()
    shutil.copy2(CUSTOM_GENERATE_DIR / "custom_generate" / "generate.py", build / "custom_generate" / "generate.py")
    for name in (REPORT_NAME, EVAL_NAME, BENCH_NAME):
        if (source / name).is_file():
            shutil.copy2(source / name, build / name)
    if not (source / REPORT_NAME).is_file():  # a checkpoint without a report keeps the card it came with
        shutil.copy2(source / "README.md", build / "README.md")
        return
    report = read_json_state(source / REPORT_NAME, "convert the checkpoint again")
    if bench:
        from hf_linattn.conversion.pipeline import resolve_base

        from .decode_bench import measure_decoding

        measured = measure_decoding(build, resolve_base(report["recipe"]["base"]))
        atomic_write_json(build / BENCH_NAME, {**measured, "teacher": report["recipe"]["base"]})  # no local path
    plotted = plot_layer_errors(report["stage1_layer_errors"], report["kept_softmax_layers"], build / PLOT_NAME)
    write_card(build, report, repo_id=repo_id, plot=PLOT_NAME if plotted else None)


def write_card(folder: Path, report: dict, *, repo_id: str | None, plot: str | None) -> Path:
    """Render README.md into an export ``folder`` from ``report`` and the folder's eval and decode reports."""
    from .card import render_model_card

    def optional(name: str) -> dict | None:
        return read_json_state(folder / name, f"remove {name} or measure again") if (folder / name).is_file() else None

    license_, license_source = base_license(report["recipe"]["base"])
    card = render_model_card(report, repo_id, eval_report=optional(EVAL_NAME), decode=optional(BENCH_NAME),
                             plot=plot, license=license_, license_source=license_source)  # fmt: skip
    path = folder / "README.md"
    path.write_text(str(card), encoding="utf-8")
    return path


def file_plan(folder: str | Path) -> list[tuple[str, int]]:
    """(path relative to ``folder``, size in bytes) of every file, sorted: what an upload of ``folder`` sends."""
    folder = Path(folder)
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def human_size(n: int) -> str:
    """1536 -> '1.5 KB' (decimal units, as the Hub shows them)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


__all__ = ["IncompleteCheckpointError", "base_license", "check_source", "export_repo", "file_plan", "human_size"]
