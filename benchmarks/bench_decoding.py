"""Decoding strategies on the embedded models: wall-clock speedup over plain greedy generate, same output.

Rows (each strategy timed side by side with plain greedy of the same target, on the same prompts):

- speculative, embedded teacher as target + embedded draft (goal >= 2x);
- speculative, a converted rdn student as target + the embedded draft;
- speculative, the converted student drafting for its own teacher;
- lookahead decoding (W, N, G) on the teacher and on the student (goal >= 1.5x);
- prompt lookup on the teacher and the student.

The draft length (``num_assistant_tokens``) and W/N/G are swept; the table reports the default and
the best setting of each. Every row checks that the output equals plain greedy token for token.

    python benchmarks/bench_decoding.py --student outputs/bench_conversion/rdn
    python benchmarks/bench_decoding.py --quick
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, describe, format_table, progress, setup, verdict, write_report

DRAFT_LENGTHS = [2, 4, 6, 8]
LOOKAHEAD = [(7, 5, 7), (5, 3, 5), (7, 3, 7), (10, 4, 10), (4, 3, 4)]  # (W, N, G); the first is the default
PROMPT_LOOKUP = [4, 2, 8]  # the first is the default


def main() -> int:
    parser = base_parser("bench_decoding", __doc__)
    parser.add_argument("--student", type=Path, default=Path("outputs/bench_conversion/rdn"),
                        help="a converted checkpoint of the embedded teacher (rows skipped if missing)")  # fmt: skip
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=192)
    parser.add_argument("--new-tokens", type=int, default=96)
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.prompt_tokens, args.new_tokens, args.repeats = 1, 48, 12, 1
    repeats = args.repeats or 2
    machine = setup(args)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_linattn.assets import DRAFT_DIR, TEACHER_DIR, heldout_texts
    from hf_linattn.generation import LookaheadStats, lookahead_generate, track_acceptance

    tok = AutoTokenizer.from_pretrained(TEACHER_DIR)
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=True).eval()  # noqa: E731
    teacher, draft = load(TEACHER_DIR), load(DRAFT_DIR)
    student = load(args.student) if (args.student / "config.json").is_file() else None
    texts = [t for t in heldout_texts() if len(tok(t).input_ids) > args.prompt_tokens + 8][: args.prompts]
    prompts = [torch.tensor([tok(t).input_ids[: args.prompt_tokens]]) for t in texts]
    greedy = dict(do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                  pad_token_id=tok.pad_token_id, eos_token_id=None)  # fmt: skip

    def gen(model, ids, **kw):
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), **greedy, **kw)

    def as_draft(model, n):
        model.generation_config.num_assistant_tokens = n
        model.generation_config.num_assistant_tokens_schedule = "constant"
        model.generation_config.assistant_confidence_threshold = 0.0
        return model

    # (row, setting, target name, target, fn(ids) -> (ids, tokens per target forward))
    cases: list[tuple[str, str, str, object, Callable]] = []

    def speculative(target, drafter, n):
        def run(ids):
            with track_acceptance(target) as stats:
                out = gen(target, ids, assistant_model=as_draft(drafter, n))
            return out, stats.mean_accepted_length
        return run

    def lookahead(target, w, n, g):
        def run(ids):
            stats = LookaheadStats()
            out = lookahead_generate(target, ids, max_new_tokens=args.new_tokens, window=w, ngram=n, guesses=g,
                                     stats=stats)  # fmt: skip
            return out, stats.mean_tokens_per_step
        return run

    def lookup(target, n):
        def run(ids):
            with track_acceptance(target) as stats:
                out = gen(target, ids, prompt_lookup_num_tokens=n)
            return out, stats.mean_accepted_length
        return run

    targets = [("teacher", teacher)] + ([("student", student)] if student is not None else [])
    for n in DRAFT_LENGTHS:
        cases.append(("speculative: teacher + draft", f"K={n}", "teacher", teacher, speculative(teacher, draft, n)))
        if student is not None:
            cases.append(("speculative: student + draft", f"K={n}", "student", student, speculative(student, draft, n)))
            cases.append(("speculative: teacher + student draft", f"K={n}", "teacher", teacher,
                          speculative(teacher, student, n)))  # fmt: skip
    for name, target in targets:
        for w, n, g in LOOKAHEAD:
            cases.append((f"lookahead: {name}", f"W={w} N={n} G={g}", name, target, lookahead(target, w, n, g)))
        for n in PROMPT_LOOKUP:
            cases.append((f"prompt lookup: {name}", f"n={n}", name, target, lookup(target, n)))

    plain = {name: (lambda ids, target=target: (gen(target, ids), 1.0)) for name, target in targets}
    times: dict[tuple[str, str], list[float]] = {}
    accepted: dict[tuple[str, str], list[float]] = {}
    identical: dict[tuple[str, str], bool] = {}
    bar = progress(len(prompts) * repeats * (len(cases) + len(plain)), "decoding", args.no_progress)
    for ids in prompts:
        reference = {name: fn(ids)[0] for name, fn in plain.items()}  # warm-up and the expected output
        for _ in range(repeats):
            runs = [(("plain", name), fn) for name, fn in plain.items()]
            runs += [((row, s), fn) for row, s, _, _, fn in cases]
            for key, fn in runs:
                start = time.perf_counter()
                out, per_step = fn(ids)
                times.setdefault(key, []).append(time.perf_counter() - start)
                accepted.setdefault(key, []).append(per_step)
                target = key[1] if key[0] == "plain" else next(c[2] for c in cases if (c[0], c[1]) == key)
                identical[key] = identical.get(key, True) and torch.equal(out, reference[target])
                bar.update(1)
    bar.close()

    results, rows = {}, []
    for row in dict.fromkeys(c[0] for c in cases):
        settings = [c for c in cases if c[0] == row]
        target = settings[0][2]
        base = statistics.median(times[("plain", target)])
        speed = {c[1]: base / statistics.median(times[(row, c[1])]) for c in settings}
        default, best = settings[0][1], max(speed, key=speed.get)
        results[row] = {
            "plain_seconds": base,
            "speedup": speed,
            "mean_tokens_per_target_forward": {s: statistics.mean(accepted[(row, s)]) for s in speed},
            "identical_greedy": {s: identical[(row, s)] for s in speed},
            "default": default,
            "best": best,
        }
        goal = 2.0 if row == "speculative: teacher + draft" else 1.5 if row.startswith("lookahead") else None
        for label, s in (("default", default), ("best", best)):
            rows.append([row, f"{label}: {s}", speed[s], results[row]["mean_tokens_per_target_forward"][s],
                         identical[(row, s)], f">= {goal}" if goal else "-",
                         verdict(speed[s], ">=", goal) if goal else "-"])  # fmt: skip
    print(f"\n{describe(machine)}")
    print(f"{len(prompts)} held-out code prompts of {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
          f"median of {repeats} runs per prompt; speedup = plain greedy time / strategy time\n")  # fmt: skip
    headers = ["strategy", "setting", "speedup", "tokens / target forward", "same greedy output", "goal", "verdict"]
    print(format_table(headers, rows))
    write_report("bench_decoding", args, machine, results)
    return 0 if all(all(r["identical_greedy"].values()) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
