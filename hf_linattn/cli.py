"""The hf-linattn command line: argument parsing, dispatch and error reporting.

Only argparse and plain-Python modules are imported here, so ``--help`` and argument errors answer
without loading torch; each command imports what it needs when it runs (``commands.py``).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from hf_linattn import __version__
from hf_linattn.errors import UserError, one_line
from hf_linattn.kernels.modes import MODES

# Softmax layer types of LinAttnConfig (hf_linattn.modeling, which loads torch); a test keeps them equal.
SOFTMAX_LAYER_TYPES = ("full_attention", "sliding_attention")
LAYER_TYPES = (*MODES, *SOFTMAX_LAYER_TYPES)
# hf_linattn.conversion.selection.SELECTIONS (loads torch); a test keeps them equal
SELECTIONS = ("error", "even", "kl")
# hf_linattn.conversion.transfer.GATE_INITS (loads torch); a test keeps them equal
GATE_INITS = ("random", "keys")
# hf_linattn.conversion.attention_transfer.ATTENTION_TRANSFER_PARAMS (loads torch); a test keeps them equal
ATTENTION_TRANSFER_PARAMS = ("new", "qk", "all")
# hf_linattn.conversion.training.LR_SCHEDULES (loads torch); a test keeps them equal
LR_SCHEDULES = ("constant", "cosine")
# groups of `hf-linattn bench ablations` (hf_linattn.evaluation.ablations.GROUPS, which loads torch; a test keeps them)
ABLATION_GROUPS = (
    "mode",
    "softmax",
    "selection",
    "clip",
    "rotary",
    "loss",
    "gates",
    "stage1",
    "stage2",
    "lr",
    "schedule",
)
# mixers of `hf-linattn bench mqar` (hf_linattn.evaluation.mqar.MIXERS, which loads torch; a test keeps them equal)
BENCH_MIXERS = (*MODES, "full_attention")

DESCRIPTION = """\
Residual linear attention (gla, gdn, rla, rdn) for Hugging Face transformers: linearize a Llama,
Qwen2 or Qwen3 checkpoint, evaluate it, publish it on the Hub.

Errors print one line and exit with status 1 (2 for a bad argument); --debug shows the traceback.
Run "hf-linattn COMMAND --help" for the options of a command."""

EPILOG = """\
examples:
  hf-linattn convert --output outputs/rdn-hybrid --mode rdn --keep-softmax 2
  hf-linattn eval outputs/rdn-hybrid
  hf-linattn export outputs/rdn-hybrid outputs/rdn-hybrid-hub --bench
  hf-linattn push outputs/rdn-hybrid --repo-id me/rdn-hybrid
  hf-linattn bench mqar --output outputs/mqar.json"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and shows every default that says something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default is None or default is False or default == [] or default == argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


_count, _positive = _int_at_least(0), _int_at_least(1)


def _comma_choices(choices: tuple[str, ...], what: str) -> Callable[[str], list[str]]:
    """An argparse type: a non-empty comma list of ``choices`` (``what`` names them in the error)."""

    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in names if t not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad}; expected a comma list of {', '.join(choices)}")
        return names

    return parse


_layer_types = _comma_choices(LAYER_TYPES, "layer type(s)")


def _indices(text: str) -> list[int]:
    try:
        indices = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 0,3; got {text!r}") from None
    if not indices or indices[0] < 0:
        raise argparse.ArgumentTypeError(f"expected layer indices >= 0 like 0,3; got {text!r}")
    return indices


def _common(progress: bool = True) -> argparse.ArgumentParser:
    """Options every command takes (defaults suppressed, so the top-level --debug is not reset)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")  # fmt: skip
    if progress:
        parent.add_argument("--no-progress", action="store_true", help="no progress bars or phase messages")
    return parent


def _budget(steps: int) -> argparse.ArgumentParser:
    """The training and evaluation budget of one conversion (convert, and every row of bench ablations)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("training and evaluation budget")
    group.add_argument("--attention-transfer-steps", type=_count, default=steps, metavar="N", help="stage-1 steps")
    group.add_argument("--lora-steps", type=_count, default=steps, metavar="N", help="stage-2 (LoRA) steps")
    group.add_argument("--selection-steps", type=_count, default=20, metavar="N",
                       help="LoRA steps per candidate layer of --softmax-selection kl")  # fmt: skip
    group.add_argument("--batch-size", type=_positive, default=4, metavar="B",
                       help="sequences per step, split over processes")  # fmt: skip
    group.add_argument("--seq-len", type=_positive, default=512, metavar="T", help="tokens per training sequence")
    group.add_argument("--seed", type=int, default=0, help="seed of initialization and batch order")
    group.add_argument("--max-train-tokens", type=_positive, default=4_000_000, metavar="N",
                       help="tokenize at most N training tokens")  # fmt: skip
    group.add_argument("--eval-tokens", type=_positive, default=65536, metavar="N", help="held-out tokens to evaluate")
    group.add_argument("--agreement-prompts", type=_positive, default=8, metavar="N",
                       help="held-out prompts for greedy agreement with the base")  # fmt: skip
    group.add_argument("--completion-prompts", type=_count, default=64, metavar="N",
                       help="held-out code lines completed greedily to a newline (exact match); 0 skips")  # fmt: skip
    return parent


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", parents=[_common(), _budget(steps=200)], formatter_class=HelpFormatter,
        help="linearize a Llama / Qwen2 / Qwen3 checkpoint (default: the embedded teacher)",
        description="Linearize a checkpoint: attention transfer (stage 1), softmax layers kept by their stage-1\n"
        "error, LoRA recovery (stage 2), evaluation and model card. The output is built in OUTPUT.partial/\n"
        "and renamed to OUTPUT when complete; rerun the same command to resume an interrupted run.",
    )  # fmt: skip
    p.add_argument("base", nargs="?", default="embedded-teacher",
                   help="local checkpoint folder, Hub id (owner/name) or embedded-teacher")  # fmt: skip
    p.add_argument("--output", type=Path, required=True,
                   help="checkpoint folder to create; must be empty, absent or an earlier conversion")  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --output that holds something else (its whole content goes)")  # fmt: skip
    p.add_argument("--restart", action="store_true",
                   help="discard an unfinished run (OUTPUT.partial) and replace a finished one")  # fmt: skip
    p.add_argument("--mode", choices=MODES, default="rdn", help="linear-attention mode of the converted layers")
    keep = p.add_mutually_exclusive_group()
    keep.add_argument("--keep-softmax", type=_count, default=0, metavar="N",
                      help="keep N layers as softmax attention, chosen by --softmax-selection")  # fmt: skip
    keep.add_argument("--keep-softmax-layers", type=_indices, default=None, metavar="I,J",
                      help="keep these layers as softmax attention, e.g. 0,3")  # fmt: skip
    p.add_argument("--softmax-selection", choices=SELECTIONS, default="error",
                   help="how --keep-softmax chooses: highest stage-1 error (free), evenly spaced, or KL-guided "
                   "(one short LoRA run per layer, ranked by KL to the base)")  # fmt: skip
    p.add_argument("--attention-transfer-lr", type=_positive_float, default=3e-1, metavar="LR",
                   help="stage-1 peak learning rate")  # fmt: skip
    p.add_argument("--attention-transfer-params", choices=ATTENTION_TRANSFER_PARAMS, default="all",
                   help="what stage 1 trains: the linear layers' new pieces (new), also q/k (qk), or also every "
                   "attention weight (all, as RADLADS)")  # fmt: skip
    p.add_argument("--attention-transfer-weights-lr", type=_positive_float, default=3e-3, metavar="LR",
                   help="stage-1 peak learning rate of the copied q/k/v/o weights that --attention-transfer-params "
                   "trains")  # fmt: skip
    p.add_argument("--lora-lr", type=_positive_float, default=1e-2, metavar="LR", help="stage-2 peak learning rate")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="cosine",
                   help="both stages: constant, or 5%% linear warmup then cosine to 10%% of the peak")  # fmt: skip
    p.add_argument("--lora-rank", type=_positive, default=8, metavar="R", help="LoRA rank")
    p.add_argument("--lora-alpha", type=_positive, default=16, metavar="A", help="LoRA alpha")
    p.add_argument("--lora-mlp", action="store_true", help="also put LoRA on the MLP projections")
    p.add_argument("--gate-init", choices=GATE_INITS, default="random",
                   help="decay-gate inputs: random, or the base's key projection pooled per head (Liger)")  # fmt: skip
    p.add_argument("--train-mixers", action="store_true",
                   help="stage 2 also trains the linear layers' new pieces (conv, gates) fully (RADLADS)")  # fmt: skip
    p.add_argument("--loss", choices=["ce", "kl", "ce+kl"], default="kl",
                   help="stage-2 loss: next-token CE, KL to the base model, or both")  # fmt: skip
    p.add_argument("--linear-rotary", action=argparse.BooleanOptionalAction, default=False,
                   help="rotary embeddings on q/k in the linear layers (default: off)")  # fmt: skip
    p.add_argument("--residual-clip", type=_positive_float, default=1.0, metavar="C",
                   help="clip bound of the residual error in rla and rdn")  # fmt: skip
    p.add_argument("--data", type=Path, nargs="*", default=[], metavar="PATH",
                   help="training text files or folders (default: the Python standard library source)")  # fmt: skip
    p.add_argument("--eval-data", type=Path, nargs="*", default=[], metavar="PATH",
                   help="held-out text files or folders (default: the embedded heldout.txt)")  # fmt: skip
    p.add_argument("--checkpoint-every", type=_positive, default=25, metavar="N",
                   help="save the resumable training state every N steps")  # fmt: skip
    p.add_argument("--tokenizer", default=None, metavar="PATH_OR_ID",
                   help="tokenizer folder or Hub id, when the base has none")  # fmt: skip
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="push the result to this Hub repo when done")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.set_defaults(handler="convert")


def _add_others(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", parents=[_common()], formatter_class=HelpFormatter,
                        help="held-out perplexity, line completion, passkey; agreement with a teacher")  # fmt: skip
    ev.add_argument("model", help="checkpoint folder or Hub id")
    ev.add_argument("--teacher", default=None, metavar="PATH_OR_ID",
                    help="model to compare with (default: the base in the model's conversion report)")  # fmt: skip
    ev.add_argument("--eval-data", type=Path, nargs="*", default=[], metavar="PATH",
                    help="held-out text files or folders (default: the embedded heldout.txt)")  # fmt: skip
    ev.add_argument("--eval-tokens", type=_positive, default=65536, metavar="N", help="held-out tokens to evaluate")
    ev.add_argument("--seq-len", type=_positive, default=512, metavar="T", help="tokens per evaluation window")
    ev.add_argument("--batch-size", type=_positive, default=4, metavar="B", help="windows per forward pass")
    ev.add_argument("--agreement-prompts", type=_positive, default=8, metavar="N",
                    help="held-out prompts for greedy agreement with the teacher")  # fmt: skip
    ev.add_argument("--completion-prompts", type=_count, default=64, metavar="N",
                    help="held-out code lines to complete greedily until a newline (exact match); 0: skip")  # fmt: skip
    ev.add_argument("--passkey-lengths", type=_int_at_least(64), nargs="*", default=[], metavar="T",
                    help="context lengths for passkey retrieval, e.g. 512 1024 2048 (default: none; slow)")  # fmt: skip
    ev.add_argument("--passkey-trials", type=_positive, default=2, metavar="N",
                    help="passkeys per length and depth (depths 0.1, 0.5, 0.9)")  # fmt: skip
    ev.add_argument("--report", type=Path, default=None, help="JSON report path (default: MODEL/eval_report.json)")
    ev.set_defaults(handler="evaluate")

    export = sub.add_parser("export", parents=[_common()], formatter_class=HelpFormatter,
                            help="write a converted checkpoint as a complete Hub model repo folder",
                            description="Write OUT: sharded safetensors with the index, config with auto_map,\n"
                            "the remote code, tokenizer, generation config, custom_generate/ (lookahead) and the\n"
                            "model card.")  # fmt: skip
    export.add_argument("folder", type=Path, help="converted checkpoint folder (hf-linattn convert's --output)")
    export.add_argument("output", type=Path, help="folder to write; must be absent or empty (see --overwrite)")
    export.add_argument("--repo-id", default=None, help="the Hub repo the card's code names (default: OWNER/NAME)")
    export.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                        help="largest weights file, e.g. 5GB or 500MB; larger weights are sharded")  # fmt: skip
    export.add_argument("--bench", action="store_true",
                        help="measure decode speed and cache memory against the teacher for the card (about a minute "
                        "for the embedded teacher on 2 CPU cores)")  # fmt: skip
    export.add_argument("--overwrite", action="store_true", help="replace an OUTPUT that is not empty")
    export.set_defaults(handler="export")

    push = sub.add_parser("push", parents=[_common()], formatter_class=HelpFormatter,
                          help="export a converted checkpoint and push it to the Hub")  # fmt: skip
    push.add_argument("folder", type=Path, help="converted checkpoint folder")
    push.add_argument("--repo-id", required=True, help="Hub repo to create or update, owner/name")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the one saved by hf auth login)")
    push.add_argument("--revision", default=None, metavar="BRANCH", help="branch to commit to (created if needed; "
                      "default: main)")  # fmt: skip
    push.add_argument("--commit-message", default="Upload hf_linattn conversion", metavar="TEXT",
                      help="message of the commit")  # fmt: skip
    push.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="largest weights file, e.g. 5GB")
    push.add_argument("--force", action="store_true",
                      help="push into a repo that exists with other content (its files are replaced)")  # fmt: skip
    push.add_argument("--dry-run", action="store_true", help="print the files and sizes that would go; upload nothing")
    push.set_defaults(handler="push")

    look = sub.add_parser("push-lookahead", parents=[_common()], formatter_class=HelpFormatter,
                          help="push the lookahead custom_generate folder to a Hub repo")  # fmt: skip
    look.add_argument("--repo-id", required=True, help="Hub repo to create or update, owner/name")
    look.add_argument("--private", action="store_true", help="create the repo private")
    look.add_argument("--token", default=None, help="Hub token (default: the one saved by hf auth login)")
    look.set_defaults(handler="push_lookahead")

    task = sub.add_parser("lm-eval-task", parents=[_common(progress=False)], formatter_class=HelpFormatter,
                          help="write a local lm-evaluation-harness task over the held-out text")  # fmt: skip
    task.add_argument("folder", type=Path, help="folder for the task files (pass it to lm_eval --include_path)")
    task.add_argument("--max-docs", type=_positive, default=16, metavar="N", help="held-out documents in the task")
    task.add_argument("--max-chars", type=_positive, default=2000, metavar="N", help="characters per document")
    task.add_argument("--completion-prompts", type=_positive, default=64, metavar="N",
                      help="held-out lines of the generate_until task")  # fmt: skip
    task.set_defaults(handler="lm_eval_task")

    demo = sub.add_parser("demo", parents=[_common()], formatter_class=HelpFormatter,
                          help="build a tiny hybrid model, generate, save, reload as remote code")  # fmt: skip
    demo.add_argument("--output", type=Path, default=Path("outputs/demo"), help="folder for checkpoint and report")
    demo.add_argument("--layer-types", type=_layer_types, default=None, metavar="T,T,...",
                      help=f"comma list of {', '.join(LAYER_TYPES)} (default: a mix of all)")  # fmt: skip
    demo.add_argument("--prompt-length", type=_positive, default=48, metavar="N", help="random prompt tokens")
    demo.add_argument("--max-new-tokens", type=_positive, default=32, metavar="N", help="tokens to generate")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random model and prompt")
    demo.set_defaults(handler="demo")

    _add_bench(sub)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 64,128; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1 like 64,128; got {text!r}")
    return values


_mixers = _comma_choices(BENCH_MIXERS, "mixer(s)")
_ablation_groups = _comma_choices(ABLATION_GROUPS, "group(s)")


def add_mqar_options(p: argparse.ArgumentParser, threads: bool = True) -> None:
    """The MQAR sweep's flags, shared by ``hf-linattn bench mqar`` and ``benchmarks/mqar.py``.

    The defaults must match ``MqarSettings`` (hf_linattn.evaluation.mqar, which loads torch); a test keeps them equal.
    List defaults are strings, so that help shows them as typed; argparse passes string defaults through ``type``.
    """
    p.add_argument("--mixers", type=_mixers, default=",".join(BENCH_MIXERS), metavar="M,M,...",
                   help="mixers to train, 2 layers each; full_attention is the softmax reference")  # fmt: skip
    p.add_argument("--dims", type=_int_list, default="64,128", metavar="D,D,...", help="model dims")
    p.add_argument("--pairs", type=_int_list, default="4,8", metavar="P,P,...", help="key-value pairs")
    p.add_argument("--seeds", type=_positive, default=2, metavar="N", help="seeds per cell (0..N-1): mean ± std")
    p.add_argument("--seq-len", type=_positive, default=128, metavar="T", help="tokens per example")
    p.add_argument("--vocab-size", type=_positive, default=None, metavar="V",
                   help="vocabulary: keys from its lower half, values from its upper half (default: "
                        "max(64, 4 x the largest --pairs))")  # fmt: skip
    p.add_argument("--steps", type=_positive, default=300, metavar="N", help="training steps per model")
    p.add_argument("--batch-size", type=_positive, default=16, metavar="B", help="examples per step")
    p.add_argument("--lr", type=_positive_float, default=3e-3, metavar="LR", help="peak AdamW learning rate")
    p.add_argument("--workers", type=_positive, default=2, metavar="N",
                   help="models trained at once, in separate processes (1: in this process)")  # fmt: skip
    if threads:  # benchmarks/_common.py's parser has its own --threads
        p.add_argument("--threads", type=_positive, default=None, metavar="N",
                       help="torch threads per worker (default: 1 with --workers > 1, else torch's)")  # fmt: skip


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", formatter_class=HelpFormatter,
                           help="model benchmarks (mqar, ablations, long-context) with JSON + PNG reports",
                           description="Benchmarks of the models themselves; each writes a JSON report and a PNG.",
                           )  # fmt: skip
    kinds = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK", help="the benchmark to run")
    # one parser per benchmark, each with its own handler in commands.py
    mqar = kinds.add_parser("mqar", parents=[_common()], formatter_class=HelpFormatter,
                            help="multi-query associative recall of tiny 2-layer models of every mode and softmax",
                            description="MQAR (Zoology): trains tiny 2-layer models of each mixer on key-value recall\n"
                            "and reports test accuracy (mean ± std over seeds) vs pairs and model dim.")  # fmt: skip
    add_mqar_options(mqar)
    mqar.add_argument("--output", type=Path, default=Path("mqar.json"), metavar="PATH",
                      help="JSON report; the plot goes beside it with the suffix .png")  # fmt: skip
    mqar.set_defaults(handler="bench_mqar")

    abl = kinds.add_parser("ablations", parents=[_common(), _budget(steps=200)], formatter_class=HelpFormatter,
                           help="conversion ablations at equal budget: mode, softmax layers, selection, clip, "
                           "rotary, loss, gates, stage-2 targets and learning rate",
                           description="Converts one base (default: the embedded teacher) once per ablation row\n"
                           "at the same budget and reports the held-out perplexity ratio, greedy agreement and\n"
                           "line exact match. Conversions go to OUTPUT_STEM_runs/ beside the report; a rerun\n"
                           "resumes.")  # fmt: skip
    abl.add_argument("--groups", type=_ablation_groups, default=",".join(ABLATION_GROUPS), metavar="G,G,...",
                     help=f"groups to run, of {', '.join(ABLATION_GROUPS)}")  # fmt: skip
    abl.add_argument("--base", default="embedded-teacher", help="checkpoint folder, Hub id or embedded-teacher")
    abl.add_argument("--output", type=Path, default=Path("ablations.json"), metavar="PATH",
                     help="JSON report; the plot goes beside it with the suffix .png")  # fmt: skip
    abl.set_defaults(handler="bench_ablations")

    lc = kinds.add_parser("long-context", parents=[_common()], formatter_class=HelpFormatter,
                          help="held-out perplexity and passkey retrieval vs context length for several models",
                          description="Per model and context length: perplexity of the last quarter of\n"
                          "held-out windows, and passkey retrieval accuracy (the key at 10%%, 50%% and 90%%\n"
                          "of the context).")  # fmt: skip
    lc.add_argument("models", nargs="+", metavar="MODEL",
                    help="folders or Hub ids sharing one tokenizer; embedded-teacher is the teacher")  # fmt: skip
    lc.add_argument("--lengths", type=_int_at_least(64), nargs="+", default=[512, 1024, 2048, 4096], metavar="T",
                    help="context lengths")  # fmt: skip
    lc.add_argument("--windows", type=_positive, default=4, metavar="N", help="held-out windows per length")
    lc.add_argument("--passkey-trials", type=_positive, default=2, metavar="N", help="passkey trials per depth")
    lc.add_argument("--output", type=Path, default=Path("long_context.json"), metavar="PATH",
                    help="JSON report; the plot goes beside it with the suffix .png")  # fmt: skip
    lc.set_defaults(handler="bench_long_context")


def build_parser() -> argparse.ArgumentParser:
    """The hf-linattn parser; every subcommand sets ``handler``, the name of its function in commands.py."""
    parser = argparse.ArgumentParser(prog="hf-linattn", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=HelpFormatter)  # fmt: skip
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(sub)
    _add_others(sub)
    return parser


def _fail(message: str, code: int) -> int:
    print(f"hf-linattn: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status. Errors print one line unless --debug (then they raise)."""
    args = build_parser().parse_args(argv)
    from hf_linattn import commands  # after parsing: --help and bad arguments never load it

    try:
        with warnings.catch_warnings():
            if not args.debug:  # the libraries' deprecation notices are for developers, not for CLI users
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
            return getattr(commands, args.handler)(args)
    except UserError as err:
        if args.debug:
            raise
        return _fail(str(err), 1)
    except KeyboardInterrupt:
        if args.debug:
            raise
        resume = "; rerun the same command to resume" if args.command == "convert" else ""
        return _fail(f"interrupted{resume}", 130)
    except Exception as err:  # a bug or an environment problem: still one line, the traceback on demand
        if args.debug:
            raise
        return _fail(f"unexpected {type(err).__name__}: {one_line(err)} (rerun with --debug for the traceback)", 1)


if __name__ == "__main__":
    sys.exit(main())
