"""GPU benchmark of the Triton kernels: chunked forward/backward of the four modes, fla and SDPA beside, block decode.

For T = 2K, 8K and 32K tokens of one realistic layer (B=1, H=16, K=V=128, bf16 q/k/v, fp32 gates), timed with
``triton.testing.do_bench`` (median of CUDA-event timings, L2 flushed between calls):

    chunked   : forward and forward+backward of gla, gdn, rla, rdn through the Triton chunk kernel
                (``chunk_residual_attention_triton``; its rows read "pending" until triton_chunk.py ships), and
                the torch chunked path for reference up to --torch-max-t tokens; ratios rdn/gdn and rla/gla
    fla       : flash-linear-attention's chunk_gated_delta_rule and chunk_simple_gla when installed (rows skipped
                otherwise); ratios our gdn / fla gdn and our gla / fla simple_gla
    sdpa      : torch scaled_dot_product_attention (flash backend, causal) at the same T
    decode    : block-decode latency from a cached (S, R) for n = 1, 4, 16 new tokens (Triton kernel with its
                rollback record; the fused one-token step; the torch block op for reference); ratio n=16 / n=1

Goals (issue 11): rdn/gdn fwd+bwd <= 1.15; our gdn / fla gdn fwd+bwd <= 1.1; block decode n=16 / n=1 <= 1.5.
Without a CUDA device the script says so and exits 0.

    python benchmarks/bench_gpu.py                 # the goal settings (a few minutes on an H100)
    python benchmarks/bench_gpu.py --quick         # smoke run: T = 512, 1024, H = 4 (seconds)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, describe, format_table, setup, verdict, write_report

from hf_linattn.kernels import MODES, is_residual
from hf_linattn.kernels.block import block_residual_attention
from hf_linattn.kernels.ops import dispatch_residual_attention

NAME = "bench_gpu"
DEVICE = "cuda"
DECODE_LENGTHS = (1, 4, 16)
GOALS = {"rdn/gdn fwd+bwd": 1.15, "our gdn / fla gdn fwd+bwd": 1.1, "block n=16 / n=1": 1.5}


def make_inputs(mode: str, T: int, heads: int, dim: int, requires_grad: bool) -> dict[str, torch.Tensor | None]:
    """q, k (L2-normalized), v in bf16 [1, T, H, D]; g, beta, gamma fp32 [1, T, H], as the layers feed them."""
    shape = (1, T, heads)

    def leaf(x: torch.Tensor) -> torch.Tensor:
        return x.detach().requires_grad_(requires_grad)

    return {
        "q": leaf(F.normalize(torch.randn(*shape, dim, device=DEVICE), dim=-1).bfloat16()),
        "k": leaf(F.normalize(torch.randn(*shape, dim, device=DEVICE), dim=-1).bfloat16()),
        "v": leaf(torch.randn(*shape, dim, device=DEVICE).bfloat16()),
        "g": leaf(F.logsigmoid(torch.randn(shape, device=DEVICE)) / 16),
        "beta": leaf(torch.sigmoid(torch.randn(shape, device=DEVICE))),
        "gamma": leaf(torch.sigmoid(torch.randn(shape, device=DEVICE))) if is_residual(mode) else None,
    }


def bench(fn: Callable[[], object], args, grad_to_none: list[torch.Tensor] | None = None) -> float:
    """Median milliseconds per call (triton.testing.do_bench: CUDA events, L2 flushed before each call)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, grad_to_none=grad_to_none, return_mode="median")


def fwd_and_fwdbwd(op: Callable[..., torch.Tensor], inputs: dict, args, errors: list[str], label: str) -> dict:
    """{"fwd": ms, "fwd+bwd": ms} of o = op(**inputs) and its backward with a fixed random do.

    A failure (out of memory, a kernel error) is recorded in ``errors`` and its cells read "oom" / "error".
    """
    leaves = [t for t in inputs.values() if t is not None]
    try:
        with torch.no_grad():
            do = torch.randn_like(op(**inputs))  # (also compiles / autotunes outside the timing)

        def fwd():
            with torch.no_grad():
                op(**inputs)

        def fwd_bwd():
            op(**inputs).backward(do)

        return {"fwd": bench(fwd, args), "fwd+bwd": bench(fwd_bwd, args, grad_to_none=leaves)}
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        errors.append(f"{label}: out of memory")
        return {"fwd": "oom", "fwd+bwd": "oom"}
    except Exception as err:  # one failing row must not hide the others; the run still exits non-zero
        errors.append(f"{label}: {type(err).__name__}: {err}")
        return {"fwd": "error", "fwd+bwd": "error"}


def ours(mode: str, backend: str) -> Callable[..., torch.Tensor]:
    def op(q, k, v, g, beta, gamma):
        scale = q.shape[-1] ** -0.5
        o, _ = dispatch_residual_attention(q, k, v, g, beta, gamma, mode=mode, clip=1.0, scale=scale,
                                           initial_state=None, output_final_state=False, backend=backend)  # fmt: skip
        return o

    return op


def fla_ops() -> dict[str, Callable[..., torch.Tensor]]:
    """flash-linear-attention's gdn and simple_gla chunk kernels, when the package imports ({} otherwise)."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        return {}

    def gdn(q, k, v, g, beta, gamma):
        return chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta.to(q.dtype), scale=q.shape[-1] ** -0.5)[0]

    def gla(q, k, v, g, beta, gamma):
        return chunk_simple_gla(q=q, k=k, v=v, g=g, scale=q.shape[-1] ** -0.5)[0]

    return {"gdn": gdn, "gla": gla}


def sdpa(q, k, v, g, beta, gamma):
    """Causal softmax attention with the flash backend, on the same q, k, v ([B, H, T, D] views)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


def ratio(a, b) -> float | str:
    return a / b if isinstance(a, float) and isinstance(b, float) else "-"


def decode_latency(kernels, mode: str, heads: int, dim: int, args) -> dict[str, float]:
    """Milliseconds per block of n tokens from a cached fp32 (S, R): the kernel with its record, the fused step
    (n = 1), the torch block op."""
    S0 = torch.randn(1, heads, dim, dim, device=DEVICE) * 0.1
    state = (S0, torch.randn_like(S0) * 0.1 if is_residual(mode) else None)
    out = {}
    with torch.no_grad():
        for n in DECODE_LENGTHS:
            x = make_inputs(mode, n, heads, dim, requires_grad=False)
            call = (x["q"], x["k"], x["v"], x["g"], x["beta"], x["gamma"], mode, 1.0, dim**-0.5, state, True)
            out[f"triton n={n}"] = bench(lambda c=call: kernels.block_residual_attention_triton(*c), args)
            out[f"torch n={n}"] = bench(lambda c=call: block_residual_attention(*c), args)
            if n == 1:
                one = [None if t is None else t[:, 0] for t in x.values()]
                out["triton step"] = bench(lambda o=one: kernels.decode_step_triton(
                    *o, mode=mode, clip=1.0, scale=dim**-0.5, state=state), args)  # fmt: skip
    return out


def main() -> None:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128, help="K = V per head")
    parser.add_argument("--torch-max-t", type=int, default=8192, help="longest T timed on the torch chunked path")
    parser.add_argument("--warmup-ms", type=int, default=25, help="do_bench warmup time per measurement")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time per measurement")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.heads, args.dim = [512, 1024], 4, 64
        args.torch_max_t, args.warmup_ms, args.rep_ms = 1024, 5, 20
    if not torch.cuda.is_available():
        print(f"{NAME}: no CUDA device here; the GPU benchmark needs one (nothing was measured).")
        return
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("warning: TRITON_INTERPRET=1 runs the kernels in the interpreter: these times mean nothing\n")
    machine = setup(args) | {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    import triton

    import hf_linattn.kernels.triton.triton_ops as kernels

    machine["triton"] = triton.__version__
    print(f"# {describe(machine)}; {machine['gpu']}, triton {machine['triton']}")
    print(f"# B=1 H={args.heads} K=V={args.dim}, bf16 q/k/v, fp32 gates; do_bench median ms\n")
    chunked_ready = set(kernels.SUPPORTED_MODES) == set(MODES)
    if not chunked_ready:
        print(f"chunked Triton rows pending: {kernels.CHUNK_UNAVAILABLE}\n")
    fla = fla_ops()
    if not fla:
        print("flash-linear-attention is not installed: its rows are skipped\n")

    errors: list[str] = []
    results: dict = {"chunked": {}, "fla": {}, "sdpa": {}, "decode": {}, "chunked_pending": not chunked_ready}

    def timed(op, mode: str, T: int, label: str) -> dict:
        return fwd_and_fwdbwd(op, make_inputs(mode, T, args.heads, args.dim, True), args, errors, label)

    for T in args.lengths:
        for mode in MODES:
            row = {}
            if chunked_ready:
                row["triton"] = timed(ours(mode, "triton"), mode, T, f"triton {mode} T={T}")
            if args.torch_max_t >= T:  # the torch path's Python loop over chunks grows slow
                row["torch"] = timed(ours(mode, "torch"), mode, T, f"torch {mode} T={T}")
            results["chunked"][f"{mode} T={T}"] = row
        for name, op in fla.items():
            results["fla"][f"{name} T={T}"] = timed(op, name, T, f"fla {name} T={T}")
        results["sdpa"][f"T={T}"] = timed(sdpa, "gla", T, f"sdpa T={T}")
    for mode in MODES:
        results["decode"][mode] = decode_latency(kernels, mode, args.heads, args.dim, args)

    report(results, args)
    results["errors"] = errors
    write_report(NAME, args, machine, results)
    if errors:
        print("\nfailed rows:\n" + "\n".join(f"  {e}" for e in errors))
        sys.exit(1)


def report(results: dict, args) -> None:
    """Print the tables (Markdown) with ratios and goal verdicts."""

    def ms(mode: str, T: int, backend: str, phase: str):
        return results["chunked"][f"{mode} T={T}"].get(backend, {}).get(phase, "-")

    rows = [[mode, T, *(ms(mode, T, b, p) for b in ("triton", "torch") for p in ("fwd", "fwd+bwd"))]
            for T in args.lengths for mode in MODES]  # fmt: skip
    print(format_table(["mode", "T", "triton fwd", "triton fwd+bwd", "torch fwd", "torch fwd+bwd"], rows))

    print("\nresidual over base (Triton chunk kernel):")
    rows, summary = [], {}
    for T in args.lengths:
        cells = [ratio(ms(r, T, "triton", p), ms(b, T, "triton", p)) for r, b in (("rdn", "gdn"), ("rla", "gla"))
                 for p in ("fwd", "fwd+bwd")]  # fmt: skip
        goal = cells[1]
        summary[f"T={T}"] = dict(zip(["rdn/gdn fwd", "rdn/gdn fwd+bwd", "rla/gla fwd", "rla/gla fwd+bwd"], cells))
        rows.append([T, *cells, verdict(goal, "<=", GOALS["rdn/gdn fwd+bwd"]) if isinstance(goal, float) else "-"])
    print(format_table(["T", "rdn/gdn fwd", "rdn/gdn fwd+bwd", "rla/gla fwd", "rla/gla fwd+bwd", "rdn/gdn goal <=1.15"],
                       rows))  # fmt: skip
    results["residual_over_base"] = summary

    if results["fla"]:
        print("\nbeside flash-linear-attention (fwd+bwd ms, and ours / fla):")
        rows = []
        for T in args.lengths:
            fla_gdn, fla_gla = (results["fla"][f"{n} T={T}"]["fwd+bwd"] for n in ("gdn", "gla"))
            gdn_ratio = ratio(ms("gdn", T, "triton", "fwd+bwd"), fla_gdn)
            goal = verdict(gdn_ratio, "<=", GOALS["our gdn / fla gdn fwd+bwd"]) if isinstance(gdn_ratio, float) else "-"
            rows.append([T, fla_gdn, fla_gla, gdn_ratio, ratio(ms("gla", T, "triton", "fwd+bwd"), fla_gla), goal])
        print(format_table(["T", "fla gdn", "fla simple_gla", "our gdn / fla gdn", "our gla / fla gla",
                            "gdn goal <=1.1"], rows))  # fmt: skip

    print("\ntorch SDPA (flash, causal) at the same T, and our rdn / SDPA (fwd+bwd):")
    rows = []
    for T in args.lengths:
        times = results["sdpa"][f"T={T}"]
        rows.append([T, times["fwd"], times["fwd+bwd"], ratio(ms("rdn", T, "triton", "fwd+bwd"), times["fwd+bwd"])])
    print(format_table(["T", "sdpa fwd", "sdpa fwd+bwd", "our rdn / sdpa"], rows))

    print("\nblock decode from a cached state (ms per block of n tokens):")
    rows = []
    for mode, d in results["decode"].items():
        growth = d["triton n=16"] / d["triton n=1"]
        d["n=16 / n=1"] = growth
        rows.append([mode, d["triton step"], *(d[f"triton n={n}"] for n in DECODE_LENGTHS), growth,
                     verdict(growth, "<=", GOALS["block n=16 / n=1"]), d["torch n=1"], d["torch n=16"]])  # fmt: skip
    print(format_table(["mode", "fused step", "n=1", "n=4", "n=16", "n=16 / n=1", "goal <=1.5", "torch n=1",
                        "torch n=16"], rows))  # fmt: skip
    if results["chunked_pending"]:
        print("\nchunked Triton rows pending (triton_chunk.py not in this build): ratios read '-'.")


if __name__ == "__main__":
    main()
