"""The ``hf-linattn`` command: ``convert``, ``eval``, ``push`` and ``demo``. Subcommands delegate to the package."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .modeling import LAYER_TYPES, LINEAR_LAYER_TYPES


def _layer_types(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in LAYER_TYPES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown layer type(s) {bad}; expected a comma list of {LAYER_TYPES}")
    return names


def _indices(text: str) -> list[int]:
    try:
        return sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 0,3; got {text!r}") from None


def _demo(args: argparse.Namespace) -> int:
    from .demo import DEFAULT_LAYER_TYPES, run_demo

    report = run_demo(
        args.output,
        layer_types=args.layer_types or DEFAULT_LAYER_TYPES,
        prompt_length=args.prompt_length,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    print(f"layers            : {', '.join(report['layer_types'])}")
    print(f"parameters        : {report['parameters']:,}")
    print(f"generated ids     : {report['generated_ids'][:16]} ...")
    print(f"cached == uncached: {report['cached_equals_uncached']}")
    print(f"reloaded as       : {report['remote_module']} (without hf_linattn importable)")
    print(f"remote == local   : {report['remote_equals_local']}")
    print(f"report            : {Path(args.output) / 'demo_report.json'}")
    return 0 if report["ok"] else 1


def _convert(args: argparse.Namespace) -> int:
    from .conversion.pipeline import REPORT_NAME, ConversionRecipe, convert

    recipe = ConversionRecipe(
        base=args.base, mode=args.mode, keep_softmax=args.keep_softmax, keep_softmax_layers=args.keep_softmax_layers,
        attention_transfer_steps=args.attention_transfer_steps, attention_transfer_lr=args.attention_transfer_lr,
        lora_steps=args.lora_steps, lora_lr=args.lora_lr, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_mlp=args.lora_mlp, loss=args.loss, batch_size=args.batch_size, seq_len=args.seq_len,
        linear_use_rotary=args.linear_rotary, residual_clip=args.residual_clip, seed=args.seed,
        data=[str(p) for p in args.data], max_train_tokens=args.max_train_tokens,
        eval_data=[str(p) for p in args.eval_data], eval_tokens=args.eval_tokens,
        agreement_prompts=args.agreement_prompts, checkpoint_every=args.checkpoint_every,
    )  # fmt: skip
    report = convert(args.output, recipe, tokenizer_path=args.tokenizer, restart=args.restart,
                     progress=not args.no_progress)  # fmt: skip
    if not report:  # not the main process of a multi-process run
        return 0
    print(f"layer types        : {', '.join(report['layer_types'])}")
    print(f"kept softmax layers: {report['kept_softmax_layers'] or 'none'}")
    print(f"stage-1 errors     : {', '.join(f'{e:.4f}' for e in report['stage1_layer_errors'])}")
    print(f"teacher perplexity : {report['teacher_perplexity']:.3f}")
    print(f"student perplexity : {report['student_perplexity']:.3f} ({report['perplexity_ratio']:.3f}x teacher)")
    print(f"greedy agreement   : {100 * report['greedy_agreement']['token_agreement']:.1f}% of tokens")
    print(f"checkpoint         : {args.output} (report: {Path(args.output) / REPORT_NAME})")
    if args.push_to_hub:
        return _push_folder(args.output, args.push_to_hub, args.private, None)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .conversion.evaluate import evaluate_checkpoint
    from .conversion.pipeline import REPORT_NAME, resolve_base

    teacher = args.teacher
    conversion_report = Path(args.model) / REPORT_NAME
    if teacher is None and conversion_report.is_file():
        teacher = resolve_base(json.loads(conversion_report.read_text())["recipe"]["base"])
    report = evaluate_checkpoint(
        args.model, teacher, [str(p) for p in args.eval_data], args.eval_tokens, args.seq_len, args.batch_size,
        args.agreement_prompts, progress=not args.no_progress,
    )  # fmt: skip
    out = args.report or Path(args.model if Path(args.model).is_dir() else ".") / "eval_report.json"
    Path(out).write_text(json.dumps(report, indent=2))
    print(f"perplexity         : {report['perplexity']:.3f} on {report['heldout_tokens']} held-out tokens")
    if teacher:
        print(f"teacher perplexity : {report['teacher_perplexity']:.3f} ({report['perplexity_ratio']:.3f}x)")
        agreement = report["greedy_agreement"]
        print(f"greedy agreement   : {100 * agreement['token_agreement']:.1f}% of tokens, "
              f"mean agreeing prefix {agreement['mean_agreeing_prefix']:.1f}")  # fmt: skip
    print(f"report             : {out}")
    return 0


def _push_folder(folder: Path, repo_id: str, private: bool, token: str | None) -> int:
    from .conversion.pipeline import REPORT_NAME
    from .hub_cards import push_to_hub, write_model_card

    report = Path(folder) / REPORT_NAME
    if report.is_file():  # re-render so the card's snippet names the repo
        write_model_card(folder, json.loads(report.read_text()), repo_id)
    print(f"pushed             : {push_to_hub(folder, repo_id, private=private, token=token)}")
    return 0


def _push(args: argparse.Namespace) -> int:
    return _push_folder(args.folder, args.repo_id, args.private, args.token)


def _lm_eval_task(args: argparse.Namespace) -> int:
    from .conversion.lm_eval_task import TASK_NAME, write_lm_eval_task

    path = write_lm_eval_task(args.folder, max_docs=args.max_docs, max_chars=args.max_chars)
    print(f"task {TASK_NAME}: {path}")
    print(f"run: lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --include_path {args.folder} "
          f"--tasks {TASK_NAME} --device cpu --batch_size 1")  # fmt: skip
    return 0


def _push_lookahead(args: argparse.Namespace) -> int:
    from .hub_cards import push_custom_generate

    print(f"pushed             : {push_custom_generate(args.repo_id, private=args.private, token=args.token)}")
    print(f"use                : model.generate(ids, custom_generate={args.repo_id!r}, trust_remote_code=True)")
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="linearize a Llama / Qwen2 / Qwen3 checkpoint (default: the embedded teacher)")
    p.add_argument("base", nargs="?", default="embedded-teacher", help="local folder or hub id (default: %(default)s)")
    p.add_argument("--output", type=Path, required=True, help="checkpoint folder; also holds the resumable state")
    p.add_argument("--mode", choices=LINEAR_LAYER_TYPES, default="rdn")
    keep = p.add_mutually_exclusive_group()
    keep.add_argument("--keep-softmax", type=int, default=0, help="keep the N layers with the highest stage-1 error")
    keep.add_argument("--keep-softmax-layers", type=_indices, default=None, help="keep these layers, e.g. 0,3")
    p.add_argument("--attention-transfer-steps", type=int, default=100)
    p.add_argument("--attention-transfer-lr", type=float, default=1e-2)
    p.add_argument("--lora-steps", type=int, default=100)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-mlp", action="store_true", help="also put LoRA on the MLP projections")
    p.add_argument("--loss", choices=["ce", "kl", "ce+kl"], default="kl", help="stage-2 loss")
    p.add_argument("--batch-size", type=int, default=4, help="global batch (split over processes)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--linear-rotary", action=argparse.BooleanOptionalAction, default=False,
                   help="rotary embeddings on q/k in the linear layers")  # fmt: skip
    p.add_argument("--residual-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, nargs="*", default=[], help="text files or folders (default: stdlib corpus)")
    p.add_argument("--max-train-tokens", type=int, default=4_000_000)
    p.add_argument("--eval-data", type=Path, nargs="*", default=[], help="held-out text (default: embedded heldout)")
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--agreement-prompts", type=int, default=8)
    p.add_argument("--checkpoint-every", type=int, default=25, help="save resumable state every N steps")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder, if not the base's own")
    p.add_argument("--restart", action="store_true", help="discard an unfinished conversion in --output")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="push the result when done")
    p.add_argument("--private", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-linattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)

    ev = sub.add_parser("eval", help="held-out perplexity and greedy agreement with a teacher")
    ev.add_argument("model", help="checkpoint folder or hub id")
    ev.add_argument("--teacher", default=None, help="default: the base named in the model's conversion report")
    ev.add_argument("--eval-data", type=Path, nargs="*", default=[])
    ev.add_argument("--eval-tokens", type=int, default=65536)
    ev.add_argument("--seq-len", type=int, default=512)
    ev.add_argument("--batch-size", type=int, default=4)
    ev.add_argument("--agreement-prompts", type=int, default=8)
    ev.add_argument("--report", type=Path, default=None, help="JSON path (default: MODEL/eval_report.json)")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=_eval)

    push = sub.add_parser("push", help="push a converted checkpoint folder to the Hub")
    push.add_argument("folder", type=Path)
    push.add_argument("--repo-id", required=True)
    push.add_argument("--private", action="store_true")
    push.add_argument("--token", default=None)
    push.set_defaults(func=_push)

    look = sub.add_parser("push-lookahead", help="push the lookahead custom_generate folder to a Hub repo")
    look.add_argument("--repo-id", required=True)
    look.add_argument("--private", action="store_true")
    look.add_argument("--token", default=None)
    look.set_defaults(func=_push_lookahead)

    task = sub.add_parser("lm-eval-task", help="write a local lm-evaluation-harness task over the held-out text")
    task.add_argument("folder", type=Path)
    task.add_argument("--max-docs", type=int, default=16)
    task.add_argument("--max-chars", type=int, default=2000)
    task.set_defaults(func=_lm_eval_task)

    demo = sub.add_parser("demo", help="build a tiny hybrid model, generate, save, reload through trust_remote_code")
    demo.add_argument("--output", type=Path, default=Path("outputs/demo"), help="folder for checkpoint and report")
    demo.add_argument("--layer-types", type=_layer_types, default=None, help="comma list, e.g. rdn,rdn,full_attention")
    demo.add_argument("--prompt-length", type=int, default=48)
    demo.add_argument("--max-new-tokens", type=int, default=32)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
