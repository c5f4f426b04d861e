"""Conversion quality on the embedded teacher: held-out perplexity of each student / the teacher's.

Variants, all at the same training budget and data, converted one after another in one run:

- ``hybrid``: rdn with 1 softmax layer in 4 kept (the layers with the highest stage-1 error); goal <= 1.10x;
- ``rdn``, ``gdn``, ``gla``: pure stacks (the ordering at equal budget is reported); rdn goal <= 1.25x;
- ``rdn+rotary``: pure rdn with rotary embeddings on q/k in the linear layers (on vs off);
- ``hybrid+mlp`` (opt-in): the hybrid with LoRA on the MLP too and LoRA lr 2e-3.

    python benchmarks/bench_conversion.py                      # goal budget (about 10 minutes per variant here)
    python benchmarks/bench_conversion.py --quick              # smoke run
    python benchmarks/bench_conversion.py --variants hybrid rdn

Each variant's checkpoint, card and conversion_report.json land in ``--output-dir/<variant>``; a rerun
resumes unfinished variants.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, describe, format_table, setup, verdict, write_report

VARIANTS = {
    "hybrid": dict(mode="rdn", keep_softmax=None),  # 1 in 4, resolved from the layer count
    "rdn": dict(mode="rdn"),
    "gdn": dict(mode="gdn"),
    "gla": dict(mode="gla"),
    "rdn+rotary": dict(mode="rdn", linear_use_rotary=True),
    # opt-in: the hybrid with LoRA on the MLP too and a higher LoRA learning rate
    "hybrid+mlp": dict(mode="rdn", keep_softmax=None, lora_mlp=True, lora_lr=2e-3),
}
DEFAULT_VARIANTS = ["hybrid", "rdn", "gdn", "gla", "rdn+rotary"]
GOALS = {"hybrid": 1.10, "hybrid+mlp": 1.10, "rdn": 1.25}


def main() -> int:
    parser = base_parser("bench_conversion", __doc__)
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    parser.add_argument("--attention-transfer-steps", type=int, default=200)
    parser.add_argument("--lora-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/bench_conversion"))
    args = parser.parse_args()
    if args.quick:
        args.attention_transfer_steps, args.lora_steps, args.seq_len, args.eval_tokens = 2, 2, 64, 1024
        args.batch_size = 2
    machine = setup(args)

    from hf_linattn.conversion.pipeline import ConversionRecipe, convert

    results: dict = {}
    for name in args.variants:
        spec = dict(VARIANTS[name])
        if name.startswith("hybrid"):
            spec["keep_softmax"] = 2  # the embedded teacher has 8 layers: 1 in 4
        recipe = ConversionRecipe(
            attention_transfer_steps=args.attention_transfer_steps, lora_steps=args.lora_steps,
            batch_size=args.batch_size, seq_len=args.seq_len, eval_tokens=args.eval_tokens, seed=args.seed,
            agreement_prompts=2 if args.quick else 8, max_train_tokens=100_000 if args.quick else 4_000_000,
            **({"completion_prompts": 4} if args.quick else {}), **spec,
        )  # fmt: skip
        start = time.time()
        # restart: a measurement converts from scratch, also over an earlier run of the same recipe
        report = convert(args.output_dir / name, recipe, restart=True, progress=not args.no_progress)
        results[name] = {
            "teacher_perplexity": report["teacher_perplexity"],
            "student_perplexity": report["student_perplexity"],
            "ratio": report["perplexity_ratio"],
            "token_agreement": report["greedy_agreement"]["token_agreement"],
            "kept_softmax_layers": report["kept_softmax_layers"],
            "stage1_mean_error": sum(report["stage1_layer_errors"]) / len(report["stage1_layer_errors"]),
            "minutes": round((time.time() - start) / 60, 2),
        }
    rows = []
    for name, r in results.items():
        goal = GOALS.get(name)
        rows.append([name, r["kept_softmax_layers"] or "-", r["student_perplexity"], r["ratio"],
                     f"<= {goal}" if goal else "-", verdict(r["ratio"], "<=", goal) if goal else "-",
                     f"{100 * r['token_agreement']:.0f}%", r["stage1_mean_error"], r["minutes"]])  # fmt: skip
    teacher = next(iter(results.values()))["teacher_perplexity"]
    print(f"\n{describe(machine)}")
    budget = f"{args.attention_transfer_steps} + {args.lora_steps} steps of {args.batch_size} x {args.seq_len} tokens"
    print(f"teacher held-out perplexity {teacher:.3f}; budget {budget}\n")
    headers = ["variant", "softmax kept", "student ppl", "ppl / teacher", "goal", "verdict", "greedy agree",
               "stage-1 err", "minutes"]  # fmt: skip
    print(format_table(headers, rows))
    pure = {m: results[m]["ratio"] for m in ("rdn", "gdn", "gla") if m in results}
    if len(pure) > 1:
        print("\nordering at equal budget (best first): " + " < ".join(sorted(pure, key=pure.get)))
    if "rdn" in results and "rdn+rotary" in results:
        print(f"rotary in linear layers: on / off = {results['rdn+rotary']['ratio'] / results['rdn']['ratio']:.3f}")
    write_report("bench_conversion", args, machine, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
