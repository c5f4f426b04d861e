"""The hf-linattn commands, one function each (``cli.py`` parses the arguments and reports errors).

Each function imports what it needs when it runs, so the parser itself stays free of torch.
Results go to stdout; progress bars and phase messages go to stderr and ``--no-progress`` turns
all of them off, transformers' and huggingface_hub's own bars included.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from hf_linattn.errors import HubError
from hf_linattn.fileio import atomic_write_json, read_json_state

if TYPE_CHECKING:  # the pipeline loads torch; the parser must not
    from hf_linattn.conversion.pipeline import ConversionRecipe


@contextlib.contextmanager
def _progress(args: argparse.Namespace, transformers: bool = False) -> Iterator[bool]:
    """Yield whether to show progress; under --no-progress, also switch off the libraries' bars (restored after)."""
    if not getattr(args, "no_progress", False):
        yield True
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    restore = []
    if not are_progress_bars_disabled():
        disable_progress_bars()
        restore.append(enable_progress_bars)
    if transformers:
        from transformers.utils import logging as transformers_logging

        if transformers_logging.is_progress_bar_enabled():
            transformers_logging.disable_progress_bar()
            restore.append(transformers_logging.enable_progress_bar)
    try:
        yield False
    finally:
        for undo in restore:
            undo()


def recipe_from_args(args: argparse.Namespace) -> ConversionRecipe:
    """The ConversionRecipe of parsed ``convert`` arguments (their defaults are the recipe's; a test checks)."""
    from hf_linattn.conversion.pipeline import ConversionRecipe

    return ConversionRecipe(
        base=args.base, tokenizer=args.tokenizer, mode=args.mode, keep_softmax=args.keep_softmax,
        keep_softmax_layers=args.keep_softmax_layers, softmax_selection=args.softmax_selection,
        selection_steps=args.selection_steps, attention_transfer_steps=args.attention_transfer_steps,
        attention_transfer_lr=args.attention_transfer_lr, attention_transfer_params=args.attention_transfer_params,
        attention_transfer_weights_lr=args.attention_transfer_weights_lr,
        lora_steps=args.lora_steps, lora_lr=args.lora_lr,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_mlp=args.lora_mlp, lr_schedule=args.lr_schedule,
        train_mixers=args.train_mixers, gate_init=args.gate_init, loss=args.loss,
        batch_size=args.batch_size, seq_len=args.seq_len, linear_use_rotary=args.linear_rotary,
        residual_clip=args.residual_clip, seed=args.seed, data=[str(p) for p in args.data],
        max_train_tokens=args.max_train_tokens, eval_data=[str(p) for p in args.eval_data],
        eval_tokens=args.eval_tokens, agreement_prompts=args.agreement_prompts,
        completion_prompts=args.completion_prompts, checkpoint_every=args.checkpoint_every,
    )  # fmt: skip


def convert(args: argparse.Namespace) -> int:
    """``hf-linattn convert``: run or resume a conversion, print its summary, push it if asked."""
    from hf_linattn.conversion.pipeline import REPORT_NAME
    from hf_linattn.conversion.pipeline import convert as run_conversion

    recipe = recipe_from_args(args)
    with _progress(args, transformers=True) as progress:
        report = run_conversion(args.output, recipe, restart=args.restart, overwrite=args.overwrite,
                                progress=progress)  # fmt: skip
    if not report:  # not the main process of a multi-process run
        return 0
    print(f"layer types        : {', '.join(report['layer_types'])}")
    print(f"kept softmax layers: {report['kept_softmax_layers'] or 'none'}")
    print(f"stage-1 errors     : {', '.join(f'{e:.4f}' for e in report['stage1_layer_errors'])}")
    print(f"teacher perplexity : {report['teacher_perplexity']:.3f}")
    print(f"student perplexity : {report['student_perplexity']:.3f} ({report['perplexity_ratio']:.3f}x teacher)")
    print(f"greedy agreement   : {100 * report['greedy_agreement']['token_agreement']:.1f}% of tokens")
    for line in _generation_lines(report):
        print(line)
    print(f"checkpoint         : {args.output} (report: {Path(args.output) / REPORT_NAME})")
    if args.push_to_hub:
        try:
            return _push_folder(args.output, args.push_to_hub, args.private, None, args)
        except HubError as err:
            raise HubError(f"{err}; the conversion itself is complete: "
                           f"hf-linattn push {args.output} --repo-id {args.push_to_hub}") from err  # fmt: skip
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """``hf-linattn eval``: perplexity (and agreement with a teacher), written as a JSON report."""
    from hf_linattn.conversion.evaluate import evaluate_checkpoint
    from hf_linattn.conversion.pipeline import REPORT_NAME, resolve_base

    teacher = args.teacher
    conversion_report = Path(args.model) / REPORT_NAME
    if teacher is None and conversion_report.is_file():
        saved = read_json_state(conversion_report, "pass --teacher, or convert the model again")
        teacher = resolve_base(saved["recipe"]["base"])
    with _progress(args, transformers=True) as progress:
        report = evaluate_checkpoint(
            args.model, teacher, eval_data=[str(p) for p in args.eval_data], eval_tokens=args.eval_tokens,
            seq_len=args.seq_len, batch_size=args.batch_size, agreement_prompts=args.agreement_prompts,
            completion_prompts=args.completion_prompts, passkey_lengths=args.passkey_lengths,
            passkey_trials=args.passkey_trials, progress=progress,
        )  # fmt: skip
    out = args.report or (Path(args.model) if Path(args.model).is_dir() else Path(".")) / "eval_report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, report)
    print(f"perplexity         : {report['perplexity']:.3f} on {report['heldout_tokens']} held-out tokens")
    if teacher:
        print(f"teacher perplexity : {report['teacher_perplexity']:.3f} ({report['perplexity_ratio']:.3f}x)")
        agreement = report["greedy_agreement"]
        print(f"greedy agreement   : {100 * agreement['token_agreement']:.1f}% of tokens, "
              f"mean agreeing prefix {agreement['mean_agreeing_prefix']:.1f}")  # fmt: skip
    for line in _generation_lines(report):
        print(line)
    print(f"report             : {out}")
    return 0


def _generation_lines(report: dict) -> list[str]:
    """The line-completion and passkey rows of an eval report, teacher beside the model where there is one."""
    rows = []
    if "line_completion" in report:
        lc = report["line_completion"]
        text = f"line exact match   : {100 * lc['exact_match']:.1f}% of {lc['prompts']} held-out code lines"
        if "teacher_exact_match" in lc:
            text += (f" (teacher {100 * lc['teacher_exact_match']:.1f}%, "
                     f"same as teacher {100 * lc['same_as_teacher']:.1f}%)")  # fmt: skip
        rows.append(text)
    if "passkey" in report:
        pk = report["passkey"]
        for length, accuracy in pk["accuracy"].items():
            teacher = pk.get("teacher_accuracy", {}).get(length)
            rows.append(f"passkey @ {length:<8} : {100 * accuracy:.0f}%"
                        + (f" (teacher {100 * teacher:.0f}%)" if teacher is not None else ""))  # fmt: skip
    return rows


def _push_folder(folder: Path, repo_id: str, private: bool, token: str | None, args: argparse.Namespace) -> int:
    from hf_linattn.hub_cards import push_to_hub

    with _progress(args, transformers=True):
        url = push_to_hub(
            folder, repo_id, private=private, token=token, revision=getattr(args, "revision", None),
            commit_message=getattr(args, "commit_message", "Upload hf_linattn conversion"),
            max_shard_size=getattr(args, "max_shard_size", "5GB"), force=getattr(args, "force", False),
            dry_run=getattr(args, "dry_run", False),
        )  # fmt: skip
    if url != "dry run":
        print(f"pushed             : {url}")
    return 0


def push(args: argparse.Namespace) -> int:
    """``hf-linattn push``: export and upload a converted folder (nothing local changes before it succeeded)."""
    return _push_folder(args.folder, args.repo_id, args.private, args.token, args)


def export(args: argparse.Namespace) -> int:
    """``hf-linattn export``: write the converted folder as a complete Hub model repo."""
    from hf_linattn.hub_cards import export_repo, file_plan
    from hf_linattn.hub_cards.export import human_size

    with _progress(args, transformers=True):
        out = export_repo(args.folder, args.output, repo_id=args.repo_id, max_shard_size=args.max_shard_size,
                          bench=args.bench, overwrite=args.overwrite)  # fmt: skip
    plan = file_plan(out)
    shards = [name for name, _ in plan if name.endswith(".safetensors")]
    print(f"exported           : {out} ({len(plan)} files, {human_size(sum(s for _, s in plan))})")
    print(f"weights            : {len(shards)} safetensors file(s)")
    print(f"push               : hf-linattn push {args.folder} --repo-id OWNER/NAME")
    return 0


def push_lookahead(args: argparse.Namespace) -> int:
    """``hf-linattn push-lookahead``: upload the lookahead-decoding custom_generate folder."""
    from hf_linattn.hub_cards import push_custom_generate

    with _progress(args):
        url = push_custom_generate(args.repo_id, private=args.private, token=args.token)
    print(f"pushed             : {url}")
    print(f"use                : model.generate(ids, custom_generate={args.repo_id!r}, trust_remote_code=True)")
    return 0


def lm_eval_task(args: argparse.Namespace) -> int:
    """``hf-linattn lm-eval-task``: write the held-out task files and print the lm_eval command."""
    from hf_linattn.conversion.lm_eval_task import GENERATION_TASK_NAME, TASK_NAME, write_lm_eval_task

    path = write_lm_eval_task(args.folder, max_docs=args.max_docs, max_chars=args.max_chars,
                              completion_prompts=args.completion_prompts)  # fmt: skip
    # the lm_eval of this environment, so the printed command works without an activated venv
    lm_eval = Path(sys.executable).parent / "lm_eval"
    print(f"task {TASK_NAME}: {path}")
    print(f"task {GENERATION_TASK_NAME}: {path.with_name(GENERATION_TASK_NAME + '.yaml')}")
    print(f"run: {lm_eval if lm_eval.is_file() else 'lm_eval'} --model hf "
          f"--model_args pretrained=DIR,trust_remote_code=True --include_path {args.folder} "
          f"--tasks {TASK_NAME},{GENERATION_TASK_NAME} --device cpu --batch_size 1")  # fmt: skip
    return 0


def demo(args: argparse.Namespace) -> int:
    """``hf-linattn demo``: a tiny hybrid model generates, is saved, and reloads as remote code."""
    from hf_linattn.demo import DEFAULT_LAYER_TYPES, run_demo

    with _progress(args, transformers=True) as progress:
        report = run_demo(
            args.output, layer_types=args.layer_types or DEFAULT_LAYER_TYPES, prompt_length=args.prompt_length,
            max_new_tokens=args.max_new_tokens, seed=args.seed, progress=progress,
        )  # fmt: skip
    print(f"layers            : {', '.join(report['layer_types'])}")
    print(f"parameters        : {report['parameters']:,}")
    print(f"generated ids     : {report['generated_ids'][:16]} ...")
    print(f"cached == uncached: {report['cached_equals_uncached']}")
    print(f"reloaded as       : {report['remote_module']} (without hf_linattn importable)")
    print(f"remote == local   : {report['remote_equals_local']}")
    print(f"report            : {Path(args.output) / 'demo_report.json'}")
    return 0 if report["ok"] else 1


def bench_mqar(args: argparse.Namespace) -> int:
    """``hf-linattn bench mqar``: train the MQAR sweep, print the accuracy table, write the JSON report and PNG."""
    from hf_linattn.evaluation.mqar import mqar_settings_from_args, run_and_report

    with _progress(args, transformers=True) as progress:
        report, png = run_and_report(mqar_settings_from_args(args), json_path=args.output, progress=progress,
                                     threads=args.threads, workers=args.workers)  # fmt: skip
    print(
        f"wall time          : {report['wall_seconds']:.0f} s ({report['workers']} worker(s), "
        f"{report['torch_threads_per_worker']} torch thread(s) each)"
    )
    print(f"report             : {args.output}")
    print(f"plot               : {png}")
    return 0


def bench_ablations(args: argparse.Namespace) -> int:
    """``hf-linattn bench ablations``: one conversion per ablation row at equal budget; table, JSON and PNG."""
    from hf_linattn.evaluation.ablations import run_and_report

    budget = dict(
        base=args.base, attention_transfer_steps=args.attention_transfer_steps, lora_steps=args.lora_steps,
        selection_steps=args.selection_steps, batch_size=args.batch_size, seq_len=args.seq_len,
        eval_tokens=args.eval_tokens, max_train_tokens=args.max_train_tokens, agreement_prompts=args.agreement_prompts,
        completion_prompts=args.completion_prompts, seed=args.seed,
    )  # fmt: skip
    with _progress(args, transformers=True) as progress:
        report, png = run_and_report(args.groups, json_path=args.output, budget=budget, progress=progress)
    print(f"wall time          : {report['wall_seconds']:.0f} s ({len(report['rows'])} conversions)")
    print(f"conversions        : {report['runs_dir']}")
    print(f"report             : {args.output}")
    print(f"plot               : {png}")
    return 0


def bench_long_context(args: argparse.Namespace) -> int:
    """``hf-linattn bench long-context``: perplexity and passkey vs context length; table, JSON and PNG."""
    from hf_linattn.evaluation.long_context import run_and_report

    with _progress(args, transformers=True) as progress:
        report, png = run_and_report(args.models, json_path=args.output, lengths=args.lengths, windows=args.windows,
                                     passkey_trials=args.passkey_trials, progress=progress)  # fmt: skip
    print(f"wall time          : {report['wall_seconds']:.0f} s")
    print(f"report             : {args.output}")
    print(f"plot               : {png}")
    return 0
