"""GPU benchmark of the Triton chunk kernels (``chunk_residual_attention_triton``): needs CUDA.

Per mode, forward and forward + backward times of the Triton kernels and of the torch chunked
path on the same bf16 inputs (triton.testing.do_bench, median ms), and the residual cost rdn/gdn
and rla/gla of the Triton kernels (the paper reports RDN at ~92% of GDN's training throughput,
i.e. a ratio of about 1.09).

    python benchmarks/bench_triton_chunk.py                 # B=4, T=4096, H=16, K=V=128
    python benchmarks/bench_triton_chunk.py --quick         # B=1, T=512, H=4, K=V=64
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table

from hf_linattn.kernels import MODES, chunked_residual_attention, is_residual


def make_inputs(B: int, T: int, H: int, K: int, V: int, mode: str) -> list:
    """bf16 inputs shaped and scaled as the layer feeds them, on CUDA, requiring gradients."""
    shape = (B, T, H)
    x = [
        F.normalize(torch.randn(*shape, K, device="cuda"), dim=-1),
        F.normalize(torch.randn(*shape, K, device="cuda"), dim=-1),
        torch.randn(*shape, V, device="cuda"),
        F.logsigmoid(torch.randn(shape, device="cuda")) / 8,
        torch.sigmoid(torch.randn(shape, device="cuda")),
        torch.sigmoid(torch.randn(shape, device="cuda")) if is_residual(mode) else None,
    ]
    return [None if t is None else t.to(torch.bfloat16).requires_grad_(True) for t in x]


def timings(fn, inputs: list, mode: str) -> tuple[float, float]:
    """(forward ms, forward + backward ms) of ``fn`` under the shared positional contract."""
    from triton.testing import do_bench

    scale = inputs[0].shape[-1] ** -0.5

    def forward():
        return fn(*inputs, mode, 1.0, scale, (None, None), False)[0]

    def train():
        forward().sum().backward()

    with torch.no_grad():
        fwd = do_bench(forward)
    return fwd, do_bench(train, grad_to_none=[t for t in inputs if t is not None])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_triton_chunk needs a CUDA GPU")
    from hf_linattn.kernels.triton.triton_chunk import chunk_residual_attention_triton

    B, T, H, K = (1, 512, 4, 64) if args.quick else (4, 4096, 16, 128)
    results, rows = {}, []
    for mode in MODES:
        torch.manual_seed(0)
        inputs = make_inputs(B, T, H, K, K, mode)
        tri = timings(chunk_residual_attention_triton, inputs, mode)
        ref = timings(chunked_residual_attention, inputs, mode)
        results[mode] = {"triton_fwd_ms": tri[0], "triton_fwdbwd_ms": tri[1], "torch_fwd_ms": ref[0]}
        results[mode]["torch_fwdbwd_ms"] = ref[1]
        rows.append([mode, tri[0], tri[1], ref[0], ref[1], ref[0] / tri[0], ref[1] / tri[1]])
    print(f"{torch.cuda.get_device_name()}, B={B} T={T} H={H} K=V={K}, bf16 inputs")
    headers = ["mode", "triton fwd ms", "triton fwd+bwd ms", "torch fwd ms", "torch fwd+bwd ms", "fwd x", "fwd+bwd x"]
    print(format_table(headers, rows))
    cost = {
        f"{res}/{base}": results[res]["triton_fwdbwd_ms"] / results[base]["triton_fwdbwd_ms"]
        for res, base in (("rla", "gla"), ("rdn", "gdn"))
    }
    print("residual cost, Triton fwd+bwd: " + ", ".join(f"{k} {v:.2f}x" for k, v in cost.items()))
    report = {"shape": {"B": B, "T": T, "H": H, "K": K, "V": K}, "results": results, "residual_cost": cost}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
