"""Op-level CPU benchmark of ``hf_linattn.kernels.residual_attention``.

(a) the chunked torch path vs the token-by-token recurrence, per mode (goal: >= 10x at T=2048);
(b) the cost of a residual mode over its base on the chunked path, rla/gla and rdn/gdn (goal: <= 1.6x).

All eight (mode, backend) calls are timed round-robin in one run. The inputs have the shape of
one layer: [B, T, H, K] fp32 with L2-normalized q and k, log decays g < 0 (alpha mostly in
0.8..1) and sigmoid write strengths beta, gamma, as the layer produces them.

    python benchmarks/bench_ops.py            # goal settings: B=1, T=2048, H=8, K=V=64
    python benchmarks/bench_ops.py --quick    # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

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

from hf_linattn.kernels import CHUNK_SIZE, MODES, chunked_residual_attention, is_residual, residual_attention

NAME = "bench_ops"
BACKENDS = ("torch", "recurrent")
SPEEDUP_GOAL = 10.0  # chunked / recurrent time, at least
RESIDUAL_COST_GOAL = 1.6  # residual mode / its base on the chunked path, at most
BASE_OF = {"rla": "gla", "rdn": "gdn"}


def make_inputs(batch: int, seq_len: int, heads: int, key_dim: int, value_dim: int) -> dict[str, torch.Tensor]:
    """Random op inputs shaped and scaled as the layer feeds them (fp32)."""
    shape = (batch, seq_len, heads)
    return {
        "q": F.normalize(torch.randn(*shape, key_dim), dim=-1),
        "k": F.normalize(torch.randn(*shape, key_dim), dim=-1),
        "v": torch.randn(*shape, value_dim),
        "g": F.logsigmoid(torch.randn(shape)) / 8,
        "beta": torch.sigmoid(torch.randn(shape)),
        "gamma": torch.sigmoid(torch.randn(shape)),
    }


def op_call(inputs: dict[str, torch.Tensor], mode: str, backend: str, chunk_size: int) -> Callable[[], object]:
    """A no-argument call of the op in ``mode`` on ``backend`` (the chunked path at ``chunk_size``)."""
    x = inputs
    gamma = x["gamma"] if is_residual(mode) else None
    if backend == "torch" and chunk_size != CHUNK_SIZE:
        scale = x["q"].shape[-1] ** -0.5
        return lambda: chunked_residual_attention(
            x["q"], x["k"], x["v"], x["g"], x["beta"], gamma, mode, 1.0, scale, (None, None), False, chunk_size
        )
    return lambda: residual_attention(x["q"], x["k"], x["v"], x["g"], x["beta"], gamma, mode=mode, backend=backend)


def parse_args() -> argparse.Namespace:
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--key-dim", type=int, default=64)
    parser.add_argument("--value-dim", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=CHUNK_SIZE, help="chunk size of the torch path")
    args = parser.parse_args()
    if args.quick:
        args.seq_len, args.heads, args.key_dim, args.value_dim = 256, 2, 32, 32
    if args.repeats is None:
        args.repeats = 2 if args.quick else 15
    return args


def main() -> None:
    args = parse_args()
    machine = setup(args)
    inputs = make_inputs(args.batch, args.seq_len, args.heads, args.key_dim, args.value_dim)
    fns = {f"{mode}/{b}": op_call(inputs, mode, b, args.chunk_size) for mode in MODES for b in BACKENDS}
    with progress(len(fns) * (args.warmup + args.repeats), NAME, args.no_progress) as bar:
        times = time_interleaved(fns, args.repeats, args.warmup, bar)
    ms = {name: median_ms(t) for name, t in times.items()}

    shape = f"B={args.batch}, T={args.seq_len}, H={args.heads}, K={args.key_dim}, V={args.value_dim}, fp32"
    print(f"residual_attention, {shape}; chunk size {args.chunk_size}")
    print(f"{describe(machine)}; median of {args.repeats} interleaved rounds\n")

    speedups, rows = {}, []
    for mode in MODES:
        rec, chunked = ms[f"{mode}/recurrent"], ms[f"{mode}/torch"]
        speedups[mode] = {"recurrent_ms": rec, "torch_ms": chunked, "speedup": rec / chunked}
        rows.append([mode, rec, chunked, f"{rec / chunked:.2f}x", verdict(rec / chunked, ">=", SPEEDUP_GOAL)])
    print(f"(a) chunked torch path vs recurrent reference (goal >= {SPEEDUP_GOAL:g}x)")
    print(format_table(["mode", "recurrent ms", "chunked ms", "speedup", "goal"], rows))

    costs, rows = {}, []
    for mode, base in BASE_OF.items():
        mode_ms, base_ms = ms[f"{mode}/torch"], ms[f"{base}/torch"]
        costs[f"{mode}/{base}"] = {"mode_ms": mode_ms, "base_ms": base_ms, "ratio": mode_ms / base_ms}
        rows.append([f"{mode} / {base}", mode_ms, base_ms, f"{mode_ms / base_ms:.2f}x",
                     verdict(mode_ms / base_ms, "<=", RESIDUAL_COST_GOAL)])  # fmt: skip
    print(f"\n(b) residual mode / its base, chunked torch path (goal <= {RESIDUAL_COST_GOAL:g}x)")
    print(format_table(["modes", "residual ms", "base ms", "ratio", "goal"], rows))

    results = {
        "shape": shape,
        "chunk_size": args.chunk_size,
        "speedup_vs_recurrent": speedups,
        "residual_over_base": costs,
        "goals": {"speedup_min": SPEEDUP_GOAL, "residual_over_base_max": RESIDUAL_COST_GOAL},
        "raw_seconds": times,
    }
    write_report(NAME, args, machine, results)


if __name__ == "__main__":
    main()
