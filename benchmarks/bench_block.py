"""CPU benchmark of the block op (decoding verification, cache rollback) vs the recurrence that logs every state.

Verifying n drafted tokens today runs the token loop of ``recurrent_residual_attention`` with
``step_states`` (the state after every token, for rollback); ``block_residual_attention`` does
the block in one parallel pass and returns a record that rebuilds the state after any prefix.
Per mode and block length n, timed side by side in one run (round-robin, each sample primed by
an untimed call, median over rounds) as thread CPU time (time.thread_time) and wall time:

    recurrent : the recurrence with step_states (n decode steps and n logged states)
    block     : block_residual_attention (outputs, final state, record)
    chunked   : chunked_residual_attention (same math, no record), for context
    prefix    : record.state_after(n // 2), the state after an accepted prefix (the rollback)

Goals: block(16) far below 16 single-token recurrent steps; block(1) close to one step.
Shapes of one layer: B=1, H=8, K=V=64, fp32, L2-normalized q, k, alpha mostly 0.9..1, from a cached state.

    python benchmarks/bench_block.py --threads 1            # n = 1 2 4 8 16 64, all modes
    python benchmarks/bench_block.py --threads 1 --quick    # smoke run (seconds)
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, describe, format_table, setup, write_report

from hf_linattn.kernels import MODES, is_residual
from hf_linattn.kernels.block import block_residual_attention
from hf_linattn.kernels.chunked import chunked_residual_attention
from hf_linattn.kernels.recurrent import recurrent_residual_attention

NAME = "bench_block"
CALLS = ("recurrent", "block", "chunked", "prefix")


def make_args(mode: str, n: int, batch: int, heads: int, key_dim: int, value_dim: int) -> tuple:
    """Positional arguments of the op (fp32, from a cached state), as the layer feeds them."""
    shape = (batch, n, heads)
    residual = is_residual(mode)
    state = (torch.randn(batch, heads, key_dim, value_dim) * 0.1, None)
    if residual:
        state = (state[0], torch.randn(batch, heads, key_dim, value_dim) * 0.1)
    return (
        F.normalize(torch.randn(*shape, key_dim), dim=-1),
        F.normalize(torch.randn(*shape, key_dim), dim=-1),
        torch.randn(*shape, value_dim),
        F.logsigmoid(torch.randn(shape)) / 8,
        torch.sigmoid(torch.randn(shape)),
        torch.sigmoid(torch.randn(shape)) if residual else None,
        mode,
        1.0,
        key_dim**-0.5,
        state,
        True,
    )


def time_round_robin(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    """Median thread CPU time and wall time (ms) per call; every timed call follows an untimed one of itself."""
    samples = {name: ([], []) for name in fns}
    order = list(fns)
    shuffle = random.Random(0).shuffle
    for round_idx in range(warmup + repeats):
        shuffle(order)
        for name in order:
            fns[name]()
            cpu, wall = time.thread_time(), time.perf_counter()
            fns[name]()
            cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
            if round_idx >= warmup:
                samples[name][0].append(cpu)
                samples[name][1].append(wall)
    return {
        name: {"cpu_ms": 1e3 * statistics.median(c), "wall_ms": 1e3 * statistics.median(w)}
        for name, (c, w) in samples.items()
    }


def main() -> None:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--lengths", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--key-dim", type=int, default=64)
    parser.add_argument("--value-dim", type=int, default=64)
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.repeats = [1, 2, 16], args.repeats or 5
    repeats = args.repeats or 31
    machine = setup(args)
    print(f"# {describe(machine)}")
    print(f"# B={args.batch} H={args.heads} K={args.key_dim} V={args.value_dim} fp32, median of {repeats} rounds\n")

    results = []
    for mode in args.modes:
        for n in args.lengths:
            op_args = make_args(mode, n, args.batch, args.heads, args.key_dim, args.value_dim)
            with torch.no_grad():  # as in decoding
                record = block_residual_attention(*op_args)[2]
                fns = {
                    "recurrent": lambda a=op_args: recurrent_residual_attention(*a, step_states=[]),
                    "block": lambda a=op_args: block_residual_attention(*a),
                    "chunked": lambda a=op_args: chunked_residual_attention(*a),
                    "prefix": lambda r=record, j=n // 2: r.state_after(j),
                }
                times = time_round_robin(fns, repeats, args.warmup)
            results.append({"mode": mode, "n": n, "record_bytes": record.nbytes(), **times})

    step = {r["mode"]: r["recurrent"]["cpu_ms"] for r in results if r["n"] == 1}
    headers = ["mode", "n", *(f"{c} cpu ms" for c in CALLS), "rec/block cpu", "rec/block wall"]
    headers += ["block / n steps", "record KiB"]
    rows = []
    for r in results:
        rows.append([
            r["mode"], r["n"], *(r[c]["cpu_ms"] for c in CALLS),
            r["recurrent"]["cpu_ms"] / r["block"]["cpu_ms"], r["recurrent"]["wall_ms"] / r["block"]["wall_ms"],
            r["block"]["cpu_ms"] / (r["n"] * step[r["mode"]]) if r["mode"] in step else float("nan"),
            r["record_bytes"] / 1024,
        ])  # fmt: skip
    print(format_table(headers, rows))
    print("\nwall ms (same runs):")
    print(
        format_table(["mode", "n", *CALLS], [[r["mode"], r["n"], *(r[c]["wall_ms"] for c in CALLS)] for r in results])
    )
    print(
        "\nrecurrent: token loop with step_states; block / n steps: block time over n one-token recurrent steps "
        "(n = 1 row); prefix: record.state_after(n // 2); record KiB includes the entering states S0 (R0)."
    )
    if args.json is not None:
        write_report(NAME, args, machine, {"rows": results})


if __name__ == "__main__":
    main()
