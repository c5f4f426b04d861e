"""Model-level CPU benchmark: how prefill time, decode time and cache size grow with context.

For LinAttnForCausalLM in each pure mode (every layer gla / gdn / rla / rdn), a hybrid (one
full_attention layer in every ``--hybrid-every``, the others ``--hybrid-mode``) and a same-size
transformers LlamaForCausalLM (sdpa), all randomly initialized (speed does not depend on weights):

(c) prefill time at the long length / at the short length (goal: linear modes <= 9x for 8x tokens);
(d) decode ms/token with a long context / with a short one (goal: linear modes <= 1.1x);
(e) cache bytes after the long prefill / after the short one (goal: exactly 1.0 for pure linear stacks).

All variants and lengths are timed round-robin in one run.

    python benchmarks/bench_model.py           # goal settings: prefill 1024 vs 8192, decode at 512 vs 8192
    python benchmarks/bench_model.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    base_parser,
    describe,
    format_table,
    median_ms,
    progress,
    setup,
    time_interleaved,
    verdict,
    write_report,
)

from hf_linattn import LinAttnConfig, LinAttnForCausalLM
from hf_linattn.modeling import LINEAR_LAYER_TYPES

NAME = "bench_model"
PREFILL_GOAL = 9.0  # prefill(long) / prefill(short) for 8x the tokens, at most (linear modes)
DECODE_GOAL = 1.1  # decode ms/token at long / short context, at most (pure linear modes)
CACHE_GOAL = 1.0  # cache bytes at long / short context, exactly (pure linear modes)


def layer_types(variant: str, args: argparse.Namespace) -> list[str]:
    """Mixer of every layer: a pure mode, or the hybrid's full_attention every ``hybrid_every`` layers."""
    if variant in LINEAR_LAYER_TYPES:
        return [variant] * args.layers
    every = args.hybrid_every
    return ["full_attention" if (i + 1) % every == 0 else args.hybrid_mode for i in range(args.layers)]


def build_model(variant: str, args: argparse.Namespace) -> nn.Module:
    """A randomly initialized model of the shared size; ``variant`` is a mode, "hybrid" or "llama"."""
    sizes = {
        "vocab_size": args.vocab,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads,
        "max_position_embeddings": 2 * max(args.prefill_lengths + args.decode_contexts),
    }
    if variant == "llama":
        model = LlamaForCausalLM._from_config(LlamaConfig(**sizes), attn_implementation="sdpa")
    else:
        model = LinAttnForCausalLM(LinAttnConfig(**sizes, layer_types=layer_types(variant, args)))
    return model.eval()


def cache_nbytes(cache: Any) -> int:
    """Bytes held by a LinAttnCache (its ``nbytes``) or a transformers DynamicCache (keys + values)."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def prefill(model: nn.Module, ids: torch.Tensor) -> Any:
    """Run the prompt with use_cache (logits of the last position only); return the cache."""
    return model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values


def decode_step(model: nn.Module, cache: Any, token: torch.Tensor) -> Callable[[], Any]:
    """A no-argument call that feeds one token through ``model`` with ``cache`` (the cache advances)."""
    return lambda: model(input_ids=token, past_key_values=cache, use_cache=True)


def parse_args() -> argparse.Namespace:
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=[*LINEAR_LAYER_TYPES, "hybrid", "llama"])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--intermediate-size", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hybrid-mode", default="rdn", choices=LINEAR_LAYER_TYPES)
    parser.add_argument("--hybrid-every", type=int, default=4, help="one full_attention layer in every N")
    parser.add_argument("--prefill-lengths", type=int, nargs=2, default=[1024, 8192], metavar=("SHORT", "LONG"))
    parser.add_argument("--decode-contexts", type=int, nargs=2, default=[512, 8192], metavar=("SHORT", "LONG"))
    parser.add_argument("--decode-steps", type=int, default=64, help="timed single-token steps per context")
    args = parser.parse_args()
    if args.quick:
        args.hidden_size, args.intermediate_size, args.layers, args.heads, args.vocab = 64, 128, 2, 2, 256
        args.hybrid_every, args.prefill_lengths, args.decode_contexts, args.decode_steps = 2, [128, 512], [64, 512], 4
    if args.repeats is None:
        args.repeats = 1 if args.quick else 9
    return args


def ratio_table(
    variants: list[str], short: dict[str, float], long: dict[str, float], goal: str, target: float
) -> tuple[list[list[Any]], dict[str, dict[str, float]]]:
    """Rows (variant, short, long, long/short, verdict) and their JSON; goals apply to pure linear modes only."""
    rows, report = [], {}
    for v in variants:
        ratio = long[v] / short[v]
        mark = verdict(ratio, goal, target) if v in LINEAR_LAYER_TYPES else "(reference)"
        rows.append([v, short[v], long[v], f"{ratio:.3f}x", mark])
        report[v] = {"short": short[v], "long": long[v], "ratio": ratio}
    return rows, report


def measure_prefill(
    models: dict[str, nn.Module], ids: torch.Tensor, args: argparse.Namespace
) -> tuple[dict[int, dict[str, float]], dict[str, list[float]]]:
    """Median prefill ms per length and variant, all (variant, length) pairs timed round-robin."""
    lengths = args.prefill_lengths
    fns = {f"{v}@{n}": (lambda m=m, n=n: prefill(m, ids[:, :n])) for v, m in models.items() for n in lengths}
    with progress(len(fns) * (args.warmup + args.repeats), "prefill", args.no_progress) as bar:
        times = time_interleaved(fns, args.repeats, args.warmup, bar)
    return {n: {v: median_ms(times[f"{v}@{n}"]) for v in models} for n in lengths}, times


def measure_decode(
    models: dict[str, nn.Module], ids: torch.Tensor, args: argparse.Namespace
) -> tuple[dict[int, dict[str, float]], dict[int, dict[str, float]], dict[str, list[float]]]:
    """Prefill every context once (cache bytes measured then), then time single-token steps round-robin.

    Returns median decode ms/token and cache bytes, per context and variant, and the raw step times.
    """
    contexts = args.decode_contexts
    token = torch.randint(0, args.vocab, (1, 1))
    caches, cache_bytes = {}, {n: {} for n in contexts}
    with torch.inference_mode(), progress(len(models) * len(contexts), "decode prefill", args.no_progress) as bar:
        for v, m in models.items():
            for n in contexts:
                caches[f"{v}@{n}"] = prefill(m, ids[:, :n])
                cache_bytes[n][v] = float(cache_nbytes(caches[f"{v}@{n}"]))
                bar.update(1)
    fns = {key: decode_step(models[key.split("@")[0]], cache, token) for key, cache in caches.items()}
    warmup = max(2, args.warmup)
    with progress(len(fns) * (warmup + args.decode_steps), "decode", args.no_progress) as bar:
        times = time_interleaved(fns, args.decode_steps, warmup, bar)
    return {n: {v: median_ms(times[f"{v}@{n}"]) for v in models} for n in contexts}, cache_bytes, times


def main() -> None:
    args = parse_args()
    machine = setup(args)
    models = {variant: build_model(variant, args) for variant in args.variants}
    ids = torch.randint(0, args.vocab, (1, max(args.prefill_lengths + args.decode_contexts)))
    prefill_ms, prefill_times = measure_prefill(models, ids, args)
    decode_ms, cache_bytes, step_times = measure_decode(models, ids, args)

    params = {v: sum(p.numel() for p in m.parameters()) for v, m in models.items()}
    print(
        f"Models: hidden {args.hidden_size}, intermediate {args.intermediate_size}, {args.layers} layers, "
        f"{args.heads} heads (head dim {args.hidden_size // args.heads}), vocab {args.vocab}, batch 1, fp32, "
        f"random init; hybrid = {layer_types('hybrid', args)}"
    )
    print("Parameters: " + ", ".join(f"{v} {p / 1e6:.2f}M" for v, p in params.items()))
    print(f"{describe(machine)}; medians of interleaved rounds\n")

    (p_short, p_long), (d_short, d_long) = args.prefill_lengths, args.decode_contexts
    rows, prefill_report = ratio_table(args.variants, prefill_ms[p_short], prefill_ms[p_long], "<=", PREFILL_GOAL)
    print(f"(c) prefill ms, T={p_long} / T={p_short} ({p_long // p_short}x the tokens; median of {args.repeats}; "
          f"goal <= {PREFILL_GOAL:g}x for pure linear modes)")  # fmt: skip
    print(format_table(["variant", f"ms @{p_short}", f"ms @{p_long}", "ratio", "goal"], rows))

    rows, decode_report = ratio_table(args.variants, decode_ms[d_short], decode_ms[d_long], "<=", DECODE_GOAL)
    print(f"\n(d) decode ms/token, {d_long} / {d_short} tokens of context (median of {args.decode_steps} steps; "
          f"goal <= {DECODE_GOAL:g}x for pure linear modes)")  # fmt: skip
    print(format_table(["variant", f"ms/tok @{d_short}", f"ms/tok @{d_long}", "ratio", "goal"], rows))

    rows, cache_report = ratio_table(args.variants, cache_bytes[d_short], cache_bytes[d_long], "==", CACHE_GOAL)
    for row in rows:
        row[1], row[2] = f"{int(row[1]):,}", f"{int(row[2]):,}"
    print(
        f"\n(e) cache bytes, {d_long} / {d_short} tokens of context (goal exactly {CACHE_GOAL:g} for pure linear modes)"
    )
    print(format_table(["variant", f"bytes @{d_short}", f"bytes @{d_long}", "ratio", "goal"], rows))

    results = {
        "layer_types": {v: (layer_types(v, args) if v != "llama" else "LlamaForCausalLM (sdpa)") for v in models},
        "parameters": params,
        "prefill_ms": prefill_report,
        "decode_ms_per_token": decode_report,
        "cache_bytes": cache_report,
        "goals": {"prefill_ratio_max": PREFILL_GOAL, "decode_ratio_max": DECODE_GOAL, "cache_ratio": CACHE_GOAL},
        "raw_seconds": {"prefill": prefill_times, "decode": step_times},
    }
    write_report(NAME, args, machine, results)


if __name__ == "__main__":
    main()
