"""Decoding strategies on the embedded models (issue 10's table): speedups over plain greedy generate(), same tokens.

One run, every time as thread CPU time (one torch thread by default) and wall time side by side:

1. forward costs after a 256-token context: one forward of K = 1, 2, 4, 8, 16 new tokens for the student
   (plain cache, and recording for rollback), the embedded Llama teacher and the embedded draft;
2. strategies, each timed next to plain greedy generate() of the same target on the same prompts, default
   and best setting, asserted token-identical: speculative decoding (draft length: transformers' default,
   hf_linattn's adaptive schedule, constant K), the student drafting for its teacher, lookahead decoding
   (W, N, G) on held-out code, prompt lookup on held-out code whose continuation copies from its prompt;
3. where the time of one speculative round goes (draft, verify, crop, generate() overhead) and the speedup
   limits that implies;
4. long context: the student drafting for its own teacher after 512, 4K and 16K tokens;
5. the compiled static decode row, read from bench_static_decode.py's report.

The student is ``--student DIR`` (a converted checkpoint), else a random-init student of the teacher's shape:
speed does not depend on the weights, acceptance does (the report says which one ran).

    python benchmarks/bench_decoding.py --student outputs/rdn-hybrid     # about 15 minutes on 2 cores
    python benchmarks/bench_decoding.py --quick
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, base_parser, describe, format_table, progress, setup, verdict, write_report
from _decoding import (
    Timed,
    code_prompts,
    configure_draft,
    copy_prompts,
    forward_costs,
    greedy,
    load_models,
    long_context,
    round_profile,
    timed,
)

from hf_linattn.generation import LookaheadStats, lookahead_decoding, track_acceptance

NAME = "bench_decoding"
SPECULATIVE = ["default", "adaptive", "adaptive_transient", "K=1", "K=2", "K=3", "K=4", "K=6", "K=8"]
STUDENT_AS_DRAFT = ["default", "adaptive", "K=1", "K=2", "K=4"]
LOOKAHEAD = [(7, 5, 7), (5, 3, 5), (4, 3, 4), (3, 2, 3), (7, 3, 7)]  # (W, N, G); the first is the default
PROMPT_LOOKUP = [4, 2, 8, 16]  # prompt_lookup_num_tokens; the first is the default
COST_LENGTHS = [1, 2, 4, 8, 16]
LONG_CONTEXTS = [512, 4096, 16384]
LONG_SETTINGS = ["adaptive", "K=1", "K=2", "K=4"]


@dataclass
class Case:
    """One strategy setting: ``run(ids, info)`` generates; with ``info`` (a dict) it also records
    ``tokens`` (committed per target forward) and ``forwards`` (target forwards)."""

    row: str
    setting: str
    target: str
    prompts: str  # "code" or "copy"
    run: Callable[[torch.Tensor, dict | None], torch.Tensor]
    draft: str | None = None
    outcome: dict[str, Any] = field(default_factory=dict)


def speculative(target, drafter, setting: str, new_tokens: int):
    def run(ids, info=None):
        configure_draft(drafter, setting)
        if info is None:
            return greedy(target, ids, new_tokens, assistant_model=drafter)
        with track_acceptance(target) as stats:
            out = greedy(target, ids, new_tokens, assistant_model=drafter)
        info.update(tokens=sum(stats.accepted) + stats.rounds, forwards=stats.rounds)
        return out

    return run


def lookahead(target, window: int, ngram: int, guesses: int, new_tokens: int):
    def run(ids, info=None):
        stats = LookaheadStats()
        out = greedy(target, ids, new_tokens, custom_generate=lookahead_decoding, lookahead_window=window,
                     lookahead_ngram=ngram, lookahead_guesses=guesses, lookahead_stats=stats)  # fmt: skip
        if info is not None:
            # the last step may commit past the limit (the output is cut); the prompt's forward commits nothing
            info.update(tokens=min(sum(stats.committed), new_tokens), forwards=stats.steps)
        return out

    return run


def prompt_lookup(target, n: int, new_tokens: int):
    def run(ids, info=None):
        if info is None:
            return greedy(target, ids, new_tokens, prompt_lookup_num_tokens=n)
        with track_acceptance(target) as stats:
            out = greedy(target, ids, new_tokens, prompt_lookup_num_tokens=n)
        info.update(tokens=sum(stats.accepted) + stats.rounds, forwards=stats.rounds)
        return out

    return run


def build_cases(models: dict, args) -> list[Case]:
    n = args.new_tokens
    student, teacher, draft = models["student"], models["teacher"], models["draft"]
    cases = []
    for name, target in (("student", student), ("teacher", teacher)):
        for s in SPECULATIVE:
            cases.append(
                Case(f"speculative: {name} + draft", s, name, "code", speculative(target, draft, s, n), "draft")
            )
    for s in STUDENT_AS_DRAFT:
        run = speculative(teacher, student, s, n)
        cases.append(Case("speculative: teacher + student as draft", s, "teacher", "code", run, "student"))
    for name, target in (("student", student), ("teacher", teacher)):
        for w, g_n, g in LOOKAHEAD:
            run = lookahead(target, w, g_n, g, n)
            cases.append(Case(f"lookahead (code): {name}", f"W={w} N={g_n} G={g}", name, "code", run))
        for k in PROMPT_LOOKUP:
            cases.append(
                Case(f"prompt lookup (copying code): {name}", f"n={k}", name, "copy", prompt_lookup(target, k, n))
            )
    return cases


def run_strategies(cases: list[Case], models: dict, prompts: dict, args, repeats: int, warmup: int) -> dict:
    """Check every case once per prompt (identical tokens, acceptance), then time all of them interleaved with
    plain greedy of each target, prompt by prompt. Fills each case's ``outcome``; returns plain totals."""
    n = args.new_tokens
    totals: dict[str, Timed] = {}
    calls = sum(
        len(p) * (repeats + warmup) * (2 + sum(c.prompts == kind for c in cases)) for kind, p in prompts.items()
    )
    bar = progress(calls, "strategies", args.no_progress)
    for kind, prompt_list in prompts.items():
        for ids in prompt_list:
            reference = {name: greedy(models[name], ids, n) for name in ("student", "teacher")}
            fns = {f"plain {name}": (lambda ids=ids, name=name: greedy(models[name], ids, n)) for name in reference}
            for case in (c for c in cases if c.prompts == kind):
                info: dict = {}
                same = bool(torch.equal(case.run(ids, info), reference[case.target]))
                case.outcome["identical"] = case.outcome.get("identical", True) and same
                for key in ("tokens", "forwards"):
                    case.outcome[key] = case.outcome.get(key, 0) + info[key]
                fns[f"{case.row} | {case.setting}"] = lambda ids=ids, case=case: case.run(ids, None)
            for key, t in timed(fns, repeats, warmup, prime=False, bar=bar).items():
                if key.startswith("plain "):
                    totals[f"{kind} {key[6:]}"] = totals.get(f"{kind} {key[6:]}", Timed(0, 0)) + t
                else:
                    case = next(c for c in cases if f"{c.row} | {c.setting}" == key)
                    case.outcome["time"] = case.outcome.get("time", Timed(0, 0)) + t
    bar.close()
    return totals


def summarize(cases: list[Case], plain: dict[str, Timed], costs: dict, args, count: dict[str, int]) -> dict:
    """Per row: every setting's speedups, tokens per target forward, cost ratios; the default and the best."""
    rows: dict[str, Any] = {}
    for row in dict.fromkeys(c.row for c in cases):
        settings = [c for c in cases if c.row == row]
        base = plain[f"{settings[0].prompts} {settings[0].target}"]
        step = base.cpu / (args.new_tokens * count[settings[0].prompts])  # plain generate() per token
        entry: dict[str, Any] = {"settings": {}}
        for c in settings:
            t, out = c.outcome["time"], c.outcome
            entry["settings"][c.setting] = {
                "speedup_cpu": base.cpu / t.cpu, "speedup_wall": base.wall / t.wall,
                "tokens_per_target_forward": out["tokens"] / out["forwards"],
                "round_over_plain_token": t.cpu / out["forwards"] / step,
                "draft_over_target_step": (costs[c.draft][1].cpu / costs[c.target][1].cpu) if c.draft else None,
                "identical_greedy": out["identical"],
            }  # fmt: skip
        by_cpu = entry["settings"]
        entry["default"], entry["best"] = settings[0].setting, max(by_cpu, key=lambda s: by_cpu[s]["speedup_cpu"])
        rows[row] = entry
    return rows


def cost_tables(costs: dict) -> tuple[str, str, dict]:
    """The forward-cost table (ms, CPU (wall)) and the ratio table (CPU time, against a plain K=1 step)."""
    header = ["model"] + [f"K={k}" for k in COST_LENGTHS]
    cells = [[name] + [f"{1e3 * by_k[k].cpu:.2f} ({1e3 * by_k[k].wall:.2f})" for k in COST_LENGTHS]
             for name, by_k in costs.items()]  # fmt: skip

    def over_step(name: str, base: str) -> dict[int, float]:
        return {k: costs[name][k].cpu / costs[base][1].cpu for k in COST_LENGTHS}

    ratios = {
        "student, recording / student K=1": over_step("student, recording", "student"),
        "student / student K=1": over_step("student", "student"),
        "teacher / teacher K=1": over_step("teacher", "teacher"),
        "draft / draft K=1": over_step("draft", "draft"),
    }
    ratio_rows = [[name] + [values[k] for k in COST_LENGTHS] for name, values in ratios.items()]
    return format_table(header, cells), format_table(["ratio (CPU time)", *header[1:]], ratio_rows), ratios


def strategy_table(rows: dict) -> str:
    lines = []
    for row, entry in rows.items():
        for label in ("default", "best"):
            v = entry["settings"][entry[label]]
            draft = "-" if v["draft_over_target_step"] is None else v["draft_over_target_step"]
            lines.append([row, f"{label}: {entry[label]}", v["speedup_cpu"], v["speedup_wall"],
                          v["tokens_per_target_forward"], v["round_over_plain_token"], draft,
                          "yes" if v["identical_greedy"] else "NO"])  # fmt: skip
    headers = ["strategy", "setting", "speedup (CPU)", "speedup (wall)", "tokens / target forward",
               "target forward / plain token", "draft / target step", "same tokens"]  # fmt: skip
    return format_table(headers, lines)


def profile_table(profiles: dict) -> str:
    lines = []
    for row, p in profiles.items():
        cpu = p["cpu"]
        ms = cpu["ms_per_round"]
        lines.append([row, p["setting"], p["tokens_per_round"], ms["draft"], ms["verify"], ms["crop"],
                      ms["generate() overhead"], cpu["round_over_plain_step"], cpu["speedup_bound_at_this_acceptance"],
                      cpu["bound_with_a_free_draft"], cpu["bound_free_draft_no_overhead"]])  # fmt: skip
    headers = ["strategy", "setting", "tokens / round", "draft ms", "verify ms", "crop ms", "generate() overhead ms",
               "round / plain step", "speedup it allows", "with a free draft", "free draft, no overhead"]  # fmt: skip
    return format_table(headers, lines)


def long_table(longs: dict) -> str:
    lines = []
    for length, r in longs.items():
        teacher, student = r["teacher_ms_per_token"]["cpu_ms"], r["student_ms_per_token"]["cpu_ms"]
        cells = [f"{r['speedup_cpu'][s]:.2f} ({r['speedup_wall'][s]:.2f}), {r['tokens_per_target_forward'][s]:.2f}"
                 for s in LONG_SETTINGS]  # fmt: skip
        needed = [r.get(f"acceptance_needed_for_{x}x") for x in (1.0, 1.5)]
        measured = r.get("measured_acceptance_k1")
        forward = r["forward_ms"]
        lines.append([length, teacher, student, student / teacher, forward["teacher 2"] / forward["teacher 1"],
                      forward["teacher 5"] / forward["teacher 1"], *cells,
                      *("-" if a is None else a for a in needed), "-" if measured is None else measured])  # fmt: skip
    headers = ["context", "teacher ms/token", "student ms/token", "student / teacher", "teacher fwd 2 / 1 tokens",
               "5 / 1 tokens", *LONG_SETTINGS, "acceptance for 1x", "acceptance for 1.5x",
               "measured acceptance (K=1)"]  # fmt: skip
    return format_table(headers, lines)


def goal_table(rows: dict, costs: dict, ratios: dict, longs: dict, static: dict | None, args) -> list[list]:
    """Issue 10's benchmark table: [setup, value (CPU), value (wall), goal, verdict, note]."""
    goals = []

    def add(name: str, value, wall, op: str, target: float, note: str = "") -> None:
        shown = ["-" if x is None else x for x in (value, wall)]
        goals.append([name, *shown, f"{op} {target}", "-" if value is None else verdict(value, op, target), note])

    step, teacher = costs["student"][1], costs["teacher"][1]
    note = f"{args.prompt_tokens}-token context"
    add("student decode step / teacher decode step", step.cpu / teacher.cpu, step.wall / teacher.wall, "<=", 1.0, note)
    k = 4 if 4 in COST_LENGTHS else COST_LENGTHS[-1]
    add(f"verify K={k} with recording / plain step K=1, student", ratios["student, recording / student K=1"][k],
        costs["student, recording"][k].wall / costs["student"][1].wall, "<=", 1.3)  # fmt: skip
    for row, target in (("speculative: student + draft", 1.5), ("speculative: teacher + draft", 1.5),
                        ("lookahead (code): student", 1.3), ("lookahead (code): teacher", 1.3),
                        ("prompt lookup (copying code): student", 1.5),
                        ("prompt lookup (copying code): teacher", 1.5)):  # fmt: skip
        best = rows[row]["settings"][rows[row]["best"]]
        note = f"best: {rows[row]['best']}, {best['tokens_per_target_forward']:.2f} tokens / target forward"
        add(row, best["speedup_cpu"], best["speedup_wall"], ">=", target, note)
    if longs:
        longest = longs[max(longs)]
        best = max(LONG_SETTINGS, key=lambda s: longest["speedup_cpu"][s])
        add(f"student drafting for its teacher, {max(longs)}-token context", longest["speedup_cpu"][best],
            longest["speedup_wall"][best], ">=", 1.5, f"best: {best}")  # fmt: skip
    add("compiled static decode / eager decode, student", static and static["ratio_cpu"], None, "<=", 0.6,
        f"from {static['source']}" if static else "run bench_static_decode.py")  # fmt: skip
    return goals


def static_row() -> dict | None:
    """compiled static / eager decode of the student, from bench_static_decode.py's last full report."""
    path = RESULTS_DIR / "bench_static_decode.json"
    if not path.is_file():
        return None
    ms = json.loads(path.read_text())["results"]["ms_per_token_cpu"]
    return {"ratio_cpu": ms["static+compile"] / ms["dynamic"], "source": str(path.relative_to(RESULTS_DIR.parent))}


def main() -> int:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--student", type=Path, default=None, help="a converted checkpoint of the embedded teacher")
    parser.add_argument("--prompts", type=int, default=3, help="prompts per prompt set")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--long-new-tokens", type=int, default=32)
    parser.add_argument("--skip-long", action="store_true", help="skip the long-context experiment")
    parser.add_argument("--few-settings", action="store_true", help="--quick's short setting lists, full sizes")
    parser.add_argument("--device", default="cpu", help="cpu or cuda; on a GPU compare the wall times")
    parser.set_defaults(threads=1)
    args = parser.parse_args()
    global SPECULATIVE, STUDENT_AS_DRAFT, LOOKAHEAD, PROMPT_LOOKUP, COST_LENGTHS, LONG_CONTEXTS, LONG_SETTINGS
    if args.quick:
        args.prompts, args.prompt_tokens, args.new_tokens, args.long_new_tokens = 1, 48, 12, 8
        SPECULATIVE, STUDENT_AS_DRAFT, LOOKAHEAD = ["default", "adaptive", "K=2"], ["adaptive", "K=2"], [(4, 3, 4)]
        PROMPT_LOOKUP, COST_LENGTHS, LONG_CONTEXTS, LONG_SETTINGS = [4], [1, 4], [64, 128], ["adaptive", "K=1"]
    elif args.few_settings:  # every section, one or two settings each (e.g. a GPU run inside a time limit)
        SPECULATIVE, STUDENT_AS_DRAFT, LOOKAHEAD = ["default", "adaptive", "K=4"], ["adaptive", "K=2"], [(4, 3, 4)]
        PROMPT_LOOKUP, LONG_SETTINGS = [4], ["adaptive", "K=2"]
    repeats, warmup = args.repeats or (1 if args.quick else 3), 0 if args.quick else args.warmup
    machine = setup(args)
    tok, teacher, draft, student, source = load_models(args.student, device=args.device)
    models = {"student": student, "teacher": teacher, "draft": draft}
    prompts = {"code": [ids.to(args.device) for ids in code_prompts(tok, args.prompts, args.prompt_tokens)]}
    copying = copy_prompts(tok, args.prompts, args.prompt_tokens, args.new_tokens)
    prompts["copy"] = [ids.to(args.device) for ids, _ in copying]

    # 1. forward costs
    cost_models = {"student": (student, False), "student, recording": (student, True), "teacher": (teacher, False),
                   "draft": (draft, False)}  # fmt: skip
    costs = forward_costs(cost_models, prompts["code"][0], COST_LENGTHS, repeats=5 if args.quick else 15, warmup=1)
    # 2. strategies
    cases = build_cases(models, args)
    plain = run_strategies(cases, models, prompts, args, repeats, warmup)
    count = {kind: len(p) for kind, p in prompts.items()}
    rows = summarize(cases, plain, costs, args, count)
    # 3. one round, piece by piece, at each speculative row's best setting
    ids = prompts["code"][0]
    profiles = {
        row: round_profile(models[target], draft, ids, args.new_tokens, rows[row]["best"], costs[target][1])
        for row, target in (("speculative: student + draft", "student"), ("speculative: teacher + draft", "teacher"))
    }
    # 4. long context
    longs = {} if args.skip_long else long_context(tok, teacher, student, LONG_CONTEXTS, args.long_new_tokens,
                                                   LONG_SETTINGS, repeats, warmup)  # fmt: skip
    static = static_row()

    print(f"\n{describe(machine)}")
    print(f"student: {source}")
    scores = ", ".join(f"{s:.2f}" for _, s in copying)
    counts = f"{len(prompts['code'])} held-out code prompts and {len(prompts['copy'])} copying-code prompts"
    print(f"{counts} (copy scores {scores}) of {args.prompt_tokens} tokens; {args.new_tokens} new tokens; "
          f"median of {repeats} runs")  # fmt: skip
    cost_text, ratio_text, ratios = cost_tables(costs)
    print(f"\n1. one forward of K new tokens after {args.prompt_tokens} tokens, ms: CPU time (wall)\n{cost_text}")
    print(f"\n{ratio_text}")
    print("\n2. strategies: speedup = plain greedy generate() time / strategy time (same target, same prompts)")
    print(strategy_table(rows))
    print("\n3. one speculative round at the best setting (CPU time; rounds after the first)")
    print(profile_table(profiles))
    if longs:
        print(f"\n4. the student drafting for its teacher at long context ({args.long_new_tokens} new tokens): "
              "speedup over plain teacher decoding, CPU (wall), tokens per teacher forward; the per-token "
              "acceptance the measured round costs need (best K)")  # fmt: skip
        print(long_table(longs))
    goals = goal_table(rows, costs, ratios, longs, static, args)
    print("\nissue 10's table (CPU time; wall beside)")
    print(format_table(["setup", "value (CPU)", "value (wall)", "goal", "verdict", "note"], goals))

    identical = all(c.outcome["identical"] for c in cases) and all(
        all(r["identical"].values()) for r in longs.values()
    )  # fmt: skip
    results = {
        "student": source,
        "copy_scores": [s for _, s in copying],
        "forward_costs": {name: {k: t.ms() for k, t in by_k.items()} for name, by_k in costs.items()},
        "forward_cost_ratios_cpu": ratios,
        "plain": {key: t.ms() for key, t in plain.items()},
        "strategies": rows,
        "round_profile": profiles,
        "long_context": longs,
        "static_decode": static,
        "goals": [dict(zip(["setup", "value_cpu", "value_wall", "goal", "verdict", "note"], g)) for g in goals],
        "all_identical": identical,
    }
    write_report(NAME, args, machine, results)
    if not identical:
        print("\nERROR: some strategy did not reproduce plain greedy token for token (see same tokens)")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
