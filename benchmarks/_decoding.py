"""Pieces of bench_decoding.py: models, prompt sets, timed forwards and generate() runs, the round profile
and the long-context drafting experiment.

Every time is measured twice in the same call: thread CPU time (steady on a shared machine with one
torch thread) and wall time. Medians over the timed rounds; callables are interleaved (``_common``).
"""

from __future__ import annotations

import copy
import inspect
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import sync, time_interleaved

from hf_linattn.generation import track_acceptance

PAD = 1  # the embedded tokenizer's pad id; never a generated token


@dataclass
class Timed:
    """Median seconds of one callable: thread CPU time and wall time, measured in the same calls."""

    cpu: float
    wall: float

    def __add__(self, other: Timed) -> Timed:
        return Timed(self.cpu + other.cpu, self.wall + other.wall)

    def ms(self) -> dict[str, float]:
        return {"cpu_ms": 1e3 * self.cpu, "wall_ms": 1e3 * self.wall}


def timed(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int,
    warmup: int,
    setups: Mapping[str, Callable[[], Any]] | None = None,
    prime: bool = True,
    bar=None,
) -> dict[str, Timed]:
    """``time_interleaved`` with both clocks; returns the medians."""
    cpu: dict[str, list[float]] = {}
    wall = time_interleaved(fns, repeats, warmup, bar=bar, prime=prime, cpu_times=cpu, setups=setups)
    return {name: Timed(statistics.median(cpu[name]), statistics.median(wall[name])) for name in fns}


# ---- models ----


def load_models(student_dir: Path | None, device: str = "cpu") -> tuple[Any, Any, Any, Any, str]:
    """(tokenizer, teacher, draft, student, what the student is). The student is the checkpoint in
    ``student_dir`` (loaded with the installed hf_linattn classes, so that the current code is measured), else
    a random-init student of the teacher's shape: 6 rdn + 2 softmax layers (the README's hybrid). All on ``device``."""
    from bench_static_decode import student_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_linattn import LinAttnForCausalLM
    from hf_linattn.assets import DRAFT_DIR, TEACHER_DIR

    tok = AutoTokenizer.from_pretrained(TEACHER_DIR)
    teacher = AutoModelForCausalLM.from_pretrained(TEACHER_DIR, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(DRAFT_DIR, dtype=torch.float32).eval()
    if student_dir is not None and (student_dir / "config.json").is_file():
        student = LinAttnForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
        source = f"converted checkpoint {student_dir}"
    else:
        torch.manual_seed(0)
        student = LinAttnForCausalLM(student_config(teacher.config)).eval()
        source = "random init of the teacher's shape (6 rdn + 2 softmax layers): speed is real, acceptance is not"
    return tok, teacher.to(device), draft.to(device), student.to(device), source


def cache_argument(model) -> str:
    """``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output) -> Any:
    return output["cache"] if "cache" in output else output["past_key_values"]


def prefill(model, ids: torch.Tensor, chunk: int = 1024):
    """The model's cache after ``ids`` [1, T], fed in chunks (a 16K-token prompt in one softmax forward would
    materialise a 16K x 16K score matrix per head)."""
    cache, name = None, cache_argument(model)
    with torch.inference_mode():
        for start in range(0, ids.shape[1], chunk):
            cache = returned_cache(model(ids[:, start : start + chunk], use_cache=True, **{name: cache}))
    return cache


def greedy(model, ids: torch.Tensor, new_tokens: int, **kwargs) -> torch.Tensor:
    """Plain greedy generate() (or what ``kwargs`` add) of exactly ``new_tokens`` tokens (no eos)."""
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                              eos_token_id=None, pad_token_id=PAD, **kwargs)  # fmt: skip


def configure_draft(draft, setting: str) -> None:
    """Draft-length setting on the draft's generation config: "default" (transformers' own: 20 tokens, stop
    below 0.4 confidence), "adaptive" / "adaptive_transient" (hf_linattn), or "K=<n>" (constant, no stop)."""
    config = draft.generation_config
    if setting == "default":
        config.num_assistant_tokens = config.num_assistant_tokens_schedule = None
        config.assistant_confidence_threshold = None
    elif setting.startswith("adaptive"):
        config.num_assistant_tokens, config.num_assistant_tokens_schedule = None, setting
        config.assistant_confidence_threshold = None
    else:
        config.num_assistant_tokens, config.num_assistant_tokens_schedule = int(setting.split("=")[1]), "constant"
        config.assistant_confidence_threshold = 0.0


# ---- prompts ----


def code_prompts(tok, count: int, length: int) -> list[torch.Tensor]:
    """The first ``length`` tokens of the first ``count`` held-out stdlib files long enough, [1, length] each."""
    from hf_linattn.assets import heldout_texts

    ids = [tok(t).input_ids for t in heldout_texts()]
    return [torch.tensor([i[:length]]) for i in ids if len(i) > length + 64][:count]


def copy_score(ids: list[int], start: int, prompt_tokens: int, new_tokens: int, n: int = 3) -> float:
    """Fraction of the continuation ``ids[start : start + new_tokens]`` that prompt lookup could copy from the
    prompt ``ids[start - prompt_tokens : start]``: tokens that follow, somewhere in the prompt, the same n-1
    tokens as they follow here."""
    prompt = ids[start - prompt_tokens : start]
    follows: dict[tuple[int, ...], set[int]] = defaultdict(set)
    for i in range(len(prompt) - n + 1):
        follows[tuple(prompt[i : i + n - 1])].add(prompt[i + n - 1])
    hits = sum(ids[j] in follows.get(tuple(ids[j - n + 1 : j]), ()) for j in range(start, start + new_tokens))
    return hits / new_tokens


def copy_prompts(tok, count: int, prompt_tokens: int, new_tokens: int, stride: int = 16):
    """Held-out code whose continuation copies from its prompt: in each held-out file, the window (prompt,
    continuation) with the highest ``copy_score``; the ``count`` best files. Returns [(prompt [1, T], score)]."""
    from hf_linattn.assets import heldout_texts

    best = []
    for text in heldout_texts():
        ids = tok(text).input_ids
        starts = range(prompt_tokens, len(ids) - new_tokens + 1, stride)
        scored = [(copy_score(ids, s, prompt_tokens, new_tokens), s) for s in starts]
        if scored:
            score, start = max(scored)
            best.append((score, ids[start - prompt_tokens : start]))
    best.sort(key=lambda pair: -pair[0])
    return [(torch.tensor([ids]), score) for score, ids in best[:count]]


def long_prompt(tok, length: int) -> torch.Tensor:
    """[1, length] tokens of held-out code: the held-out files one after another (no file repeated if possible)."""
    from hf_linattn.assets import heldout_texts

    ids: list[int] = []
    texts = heldout_texts()
    while len(ids) < length:
        for text in texts:
            ids += tok(text).input_ids
            if len(ids) >= length:
                break
    return torch.tensor([ids[:length]])


# ---- forward costs ----


def forward_costs(
    models: Mapping[str, tuple[Any, bool]], context: torch.Tensor, lengths: list[int], repeats: int, warmup: int
) -> dict[str, dict[int, Timed]]:
    """Seconds of one forward of K new tokens after ``context`` [1, T], for K in ``lengths``: by model name,
    (model, recording for rollback). Every call starts from the same prefilled cache (a copy, made untimed)."""
    fns, setups, where = {}, {}, {}
    tokens = context[:, -max(lengths) :].flip(1)  # real token ids, positions after the context
    for name, (model, recording) in models.items():
        base = prefill(model, context)
        arg = cache_argument(model)
        for k in lengths:
            key = f"{name} K={k}"
            where[key] = (name, k)
            state: dict[str, Any] = {}

            def setup(base=base, state=state, recording=recording) -> None:
                state["cache"] = copy.deepcopy(base)
                if recording:
                    state["cache"].activate_past_recording()

            def run(model=model, state=state, arg=arg, k=k) -> None:
                model(tokens[:, :k], use_cache=True, **{arg: state["cache"]})

            fns[key], setups[key] = run, setup
    medians = timed(fns, repeats, warmup, setups=setups)
    out: dict[str, dict[int, Timed]] = defaultdict(dict)
    for key, t in medians.items():
        name, k = where[key]
        out[name][k] = t
    return dict(out)


# ---- one speculative round, timed piece by piece ----


class _Clock:
    """Thread CPU time and wall time of the pieces of a generate() call."""

    def __init__(self) -> None:
        self.spans: dict[str, list[tuple[float, float]]] = defaultdict(list)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed_call(*args, **kwargs):
            sync()
            cpu, wall = time.thread_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                self.spans[name].append((time.thread_time() - cpu, time.perf_counter() - wall))

        return timed_call


def round_profile(target, draft, ids: torch.Tensor, new_tokens: int, setting: str, plain_step: Timed) -> dict:
    """Where one speculative round's time goes (rounds after the first, which prefills): the draft's
    generate() call, the target's verify forward, the cache crop, and the rest of generate() (acceptance,
    logits processing, stopping criteria, input preparation). Also the speedup this allows at the measured
    acceptance, and the ceilings with a free draft and with no generate() overhead. ``plain_step``: one plain
    decode step of the target at this context."""
    clock = _Clock()
    make = target._get_candidate_generator

    def instrumented(*args, **kwargs):
        generator = make(*args, **kwargs)
        generator.get_candidates = clock.wrap("draft", generator.get_candidates)
        return generator

    def hook_pre(module, args, kwargs):
        sync()
        clock.spans.setdefault("_start", []).append((time.thread_time(), time.perf_counter()))

    def hook_post(module, args, kwargs, output):
        sync()
        cpu, wall = clock.spans["_start"].pop()
        clock.spans["verify"].append((time.thread_time() - cpu, time.perf_counter() - wall))

    configure_draft(draft, setting)
    cache = type(prefill(target, ids[:, :2]))(config=target.config)  # an empty cache of the target's own kind
    cache.crop = clock.wrap("crop", cache.crop)
    handles = [target.register_forward_pre_hook(hook_pre, with_kwargs=True),
               target.register_forward_hook(hook_post, with_kwargs=True)]  # fmt: skip
    target._get_candidate_generator = instrumented
    try:
        with track_acceptance(target) as stats:
            sync()
            cpu, wall = time.thread_time(), time.perf_counter()
            greedy(target, ids, new_tokens, assistant_model=draft, **{cache_argument(target): cache})
            sync()
            total = (time.thread_time() - cpu, time.perf_counter() - wall)
    finally:
        target.__dict__.pop("_get_candidate_generator", None)
        for handle in handles:
            handle.remove()
    rounds = stats.rounds
    parts = {name: clock.spans[name] for name in ("draft", "verify", "crop")}
    per_round = {}
    for clock_index, label in ((0, "cpu"), (1, "wall")):
        later = {name: [s[clock_index] for s in spans[1:]] for name, spans in parts.items()}
        spent = sum(s[clock_index] for spans in parts.values() for s in spans)
        per_round[label] = {name: statistics.mean(v) if v else 0.0 for name, v in later.items()}
        per_round[label]["generate() overhead"] = (total[clock_index] - spent) / max(rounds, 1)
    tokens = (sum(stats.accepted) + rounds) / max(rounds, 1)
    result = {"setting": setting, "rounds": rounds, "tokens_per_round": tokens,
              "drafted_per_round": sum(stats.drafted) / max(rounds, 1)}  # fmt: skip
    for label, step in (("cpu", plain_step.cpu), ("wall", plain_step.wall)):
        parts_ms = per_round[label]
        round_s = sum(parts_ms.values())
        result[label] = {
            "ms_per_round": {k: 1e3 * v for k, v in parts_ms.items()},
            "round_over_plain_step": round_s / step,
            "speedup_bound_at_this_acceptance": tokens * step / round_s,
            "bound_with_a_free_draft": tokens * step / (round_s - parts_ms["draft"]),
            "bound_free_draft_no_overhead": tokens * step / (parts_ms["verify"] + parts_ms["crop"]),
        }
    return result


# ---- long context: the student drafting for its own teacher ----


def continue_from_cache(model) -> Callable[[], None]:
    """transformers 5.24's assisted decoding feeds the target the whole sequence in its first forward
    (``next_sequence_length=None``), even when generate() was given a prefilled cache; for a model without its own
    ``prepare_inputs_for_generation`` rule for that case (Llama) the prompt would be processed twice. While
    installed, the first forward feeds only the tokens the cache lacks. Returns the function that uninstalls it."""
    prepare = model.prepare_inputs_for_generation

    def prepare_uncached(input_ids, next_sequence_length=None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if next_sequence_length is None and cache is not None and 0 < cache.get_seq_length() < input_ids.shape[1]:
            next_sequence_length = input_ids.shape[1] - cache.get_seq_length()
        return prepare(input_ids, next_sequence_length=next_sequence_length, **kwargs)

    model.prepare_inputs_for_generation = prepare_uncached
    return lambda: model.__dict__.pop("prepare_inputs_for_generation", None)


def inject_draft_cache(target, draft, draft_cache_factory: Callable[[], Any]) -> Callable[[], None]:
    """While installed, every assisted generate() of ``target`` starts its draft from a copy of a prefilled cache
    (``draft_cache_factory()``), so that timing a 16K-token context does not time the draft's prefill. Returns
    the function that uninstalls it."""
    make = target._get_candidate_generator
    name = cache_argument(draft)

    def with_cache(*args, **kwargs):
        generator = make(*args, **kwargs)
        inner = getattr(generator, "inner", generator)  # the adaptive schedule wraps transformers' generator
        inner.assistant_kwargs[name] = draft_cache_factory()
        return generator

    target._get_candidate_generator = with_cache
    return lambda: target.__dict__.pop("_get_candidate_generator", None)


def acceptance_needed(round_over_plain: float, draft_length: int, speedup: float) -> float | None:
    """The per-token acceptance a at which rounds of K drafted tokens, each costing ``round_over_plain`` plain
    decode steps, give ``speedup``: E[tokens | K] = (1 - a^(K+1)) / (1 - a) = speedup * round_over_plain.
    None if even a = 1 does not reach it."""
    need = speedup * round_over_plain
    if need > draft_length + 1:
        return None
    low, high = 0.0, 1.0
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if sum(mid**i for i in range(draft_length + 1)) < need else (low, mid)
    return high


def rollback_forward_costs(teacher, teacher_cache, student, student_cache, ids: torch.Tensor) -> dict:
    """ms (CPU) of one teacher forward of 1, 2 and 5 tokens (a step; verifying 1 and 4 drafted tokens) and of one
    student step, on the prefilled caches, each rolled back by a crop (part of the timed call) so that the
    context stays put: no cache copy is timed or allocated per call."""
    student_cache.activate_past_recording()
    fns = {}
    for name, model, cache, lengths in (("teacher", teacher, teacher_cache, (1, 2, 5)),
                                        ("student", student, student_cache, (1,))):  # fmt: skip
        arg = cache_argument(model)
        for k in lengths:

            def run(model=model, cache=cache, arg=arg, k=k) -> None:
                model(ids[:, -k:], use_cache=True, **{arg: cache})
                cache.crop(-k)

            fns[f"{name} {k}"] = run
    return {key: 1e3 * t.cpu for key, t in timed(fns, repeats=5, warmup=1).items()}


def long_context(tok, teacher, student, contexts: list[int], new_tokens: int, settings: list[str], repeats: int,
                 warmup: int) -> dict:  # fmt: skip
    """The student drafting for its own teacher after ``contexts`` tokens of held-out code, against plain teacher
    decoding from the same prefilled cache. Both caches are prefilled once, untimed; every timed call starts
    from copies made untimed. Per context: speedup per setting (CPU, wall), tokens per teacher forward, whether
    the output is identical, both models' plain generate() time per token there, and, from the measured cost of
    a round with K drafted tokens, the per-token acceptance the student would need for 1x and 1.5x (the embedded
    models were trained on 2048-token windows, so their agreement past that says little)."""
    results = {}
    arg = cache_argument(teacher)
    for length in contexts:
        ids = long_prompt(tok, length).to(teacher.device)
        teacher_base, student_base = prefill(teacher, ids[:, :-1]), prefill(student, ids[:, :-2])
        state: dict[str, Any] = {}

        def fresh(state=state, teacher_base=teacher_base, student_base=student_base) -> None:
            state["teacher"] = copy.deepcopy(teacher_base)
            state["student"] = copy.deepcopy(student_base)
            state["student"].activate_past_recording()  # the draft rolls back what the teacher rejects

        fresh()
        reference = greedy(teacher, ids, new_tokens, **{arg: state["teacher"]})  # before any of the wrappers
        uninstalls = [inject_draft_cache(teacher, student, lambda state=state: state["student"]),
                      continue_from_cache(teacher)]  # fmt: skip
        try:
            runs = {
                "plain": lambda ids=ids, state=state: greedy(teacher, ids, new_tokens, **{arg: state["teacher"]}),
                "student plain": lambda ids=ids, state=state: greedy(student, ids, new_tokens,
                                                                      **{arg: state["student"]}),
            }  # fmt: skip
            row: dict[str, Any] = {"identical": {}, "tokens_per_target_forward": {}, "rounds": {}}
            for setting in settings:

                def run(setting=setting, ids=ids, state=state):
                    configure_draft(student, setting)
                    return greedy(teacher, ids, new_tokens, assistant_model=student, **{arg: state["teacher"]})

                fresh()
                with track_acceptance(teacher) as stats:
                    row["identical"][setting] = bool(torch.equal(run(), reference))
                row["tokens_per_target_forward"][setting] = stats.mean_accepted_length
                row["rounds"][setting] = stats.rounds
                runs[setting] = run
            medians = timed(runs, repeats, warmup, setups=dict.fromkeys(runs, fresh), prime=False)
        finally:
            for uninstall in uninstalls:
                uninstall()
        row["forward_ms"] = rollback_forward_costs(teacher, teacher_base, student, student_base, ids)
        plain = medians["plain"]
        row["speedup_cpu"] = {s: plain.cpu / medians[s].cpu for s in settings}
        row["speedup_wall"] = {s: plain.wall / medians[s].wall for s in settings}
        row["teacher_ms_per_token"] = {k: v / new_tokens for k, v in plain.ms().items()}
        row["student_ms_per_token"] = {k: v / new_tokens for k, v in medians["student plain"].ms().items()}
        # a round with K drafted tokens, in plain teacher tokens (CPU time), and the acceptance it needs
        row["round_over_plain_token"] = {
            s: medians[s].cpu / row["rounds"][s] / (plain.cpu / new_tokens) for s in settings if s.startswith("K=")
        }
        for target in (1.0, 1.5):
            needed = [acceptance_needed(r, int(s[2:]), target) for s, r in row["round_over_plain_token"].items()]
            row[f"acceptance_needed_for_{target}x"] = min((a for a in needed if a is not None), default=None)
        if "K=1" in settings:
            row["measured_acceptance_k1"] = row["tokens_per_target_forward"]["K=1"] - 1
        results[length] = row
    return results
