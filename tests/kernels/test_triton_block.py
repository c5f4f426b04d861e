"""The Triton block-decode kernel against the references (the recurrence and block.py's torch block op), all modes.

Runs under the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 before any import),
and as compiled kernels on a CUDA device when there is one (``TRITON_INTERPRET=0 python -m pytest ...``).
Tiny shapes: the interpreter runs every program in Python. V = 12 is not a power of two and spans two
value blocks of the kernel (masks), K != V catches transposed states.
"""

from __future__ import annotations

import os

import pytest
import torch

from hf_linattn.kernels import MODES, is_residual
from hf_linattn.kernels.decode import decode_step

from .test_block import CLIP, B, H, K, V, block, check_states, make_inputs, reference, rel_err

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: Triton kernels cannot launch", allow_module_level=True)

from hf_linattn.kernels.triton.triton_block import block_residual_attention_triton, decode_step_triton  # noqa: E402

# fp32 states from fp32 or bf16-loaded inputs (the reference runs in fp64 on the same rounded values);
# bf16 outputs carry bf16 rounding (the interpreter truncates instead of rounding: up to 2^-8 relative)
# Compiled (GPU) Triton passes Python float arguments (clip, scale) as fp32 scalars: fp64 results then differ
# from the fp64 reference at ~1e-8 (measured 6e-10 to 1.4e-8 on an H100); the interpreter keeps them fp64.
FP64_TOL = 1e-10 if DEVICE.type == "cpu" else 5e-8
TOL = {torch.float64: FP64_TOL, torch.float32: 2e-5, torch.bfloat16: 2e-5}
TOL_OUT = {torch.float64: FP64_TOL, torch.float32: 2e-5, torch.bfloat16: 8e-3}


def kernel_inputs(mode: str, n: int, dtype: torch.dtype, seed: int, initial_state: bool = True) -> list:
    """test_block's inputs on DEVICE: q, k, v in ``dtype``; gates and states fp32 (fp64 with fp64), as layers give."""
    gate_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    inputs = make_inputs(mode, n, torch.float64, seed=seed, initial_state=initial_state)
    return [None if t is None else t.to(device=DEVICE, dtype=dtype if i < 3 else gate_dtype)
            for i, t in enumerate(inputs)]  # fmt: skip


def run_kernel(inputs, mode: str, **kw):
    q, k, v, g, beta, gamma, S0, R0 = inputs
    state = (S0, R0) if S0 is not None else None
    return block_residual_attention_triton(q, k, v, g, beta, gamma, mode, CLIP, K**-0.5, state, True, **kw)


def on_cpu(inputs) -> list:
    return [None if t is None else t.cpu() for t in inputs]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_block_kernel_matches_references(mode, n, dtype):
    inputs = kernel_inputs(mode, n, dtype, seed=100 * n + 3)
    o_ref, e_ref, states = reference(on_cpu(inputs), mode)
    if is_residual(mode) and n >= 17:
        clipped = (e_ref.abs() > CLIP).double().mean().item()
        assert 0.2 < clipped < 0.95, f"the clip must be active on a good share of errors ({clipped:.2f})"
    o, (S, R), record = run_kernel(inputs, mode)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert o.dtype == dtype and o.shape == (B, n, H, V) and o.is_contiguous() and o.device.type == DEVICE.type
    assert S.dtype == state_dtype and len(record) == n
    assert rel_err(o.cpu(), o_ref) < TOL_OUT[dtype]
    assert rel_err(S.cpu(), states[-1][0]) < TOL[dtype]
    assert rel_err(None if R is None else R.cpu(), states[-1][1]) < TOL[dtype]
    # every per-position state: the state after each accepted prefix, rebuilt from the kernel's record
    check_states(record, [tuple(None if s is None else s.to(DEVICE) for s in st) for st in states],
                 mode, TOL[dtype])  # fmt: skip
    # the record holds what the torch block op's record holds
    _, _, torch_record = block(on_cpu(inputs), mode)
    assert record.k.dtype == state_dtype and record.g.dtype == torch.float64
    assert rel_err(record.k.cpu(), torch_record.k) == 0.0
    assert torch.equal(record.g.cpu(), torch_record.g)  # resets (-inf) included
    assert rel_err(record.x.cpu(), torch_record.x) < TOL[dtype]
    assert rel_err(None if record.y is None else record.y.cpu(), torch_record.y) < TOL[dtype]


@pytest.mark.parametrize("mode", MODES)
def test_from_zero_state_and_options(mode):
    """No entering state; the final state and the record are only made when asked."""
    inputs = kernel_inputs(mode, 5, torch.float32, seed=11, initial_state=False)
    o_ref, _, states = reference(on_cpu(inputs), mode)
    o, (S, R), record = run_kernel(inputs, mode)
    assert record.S0 is None and record.R0 is None
    assert rel_err(o.cpu(), o_ref) < 2e-5 and rel_err(S.cpu(), states[-1][0]) < 2e-5
    assert rel_err(None if R is None else R.cpu(), states[-1][1]) < 2e-5
    S_half, _ = record.state_after(2)
    assert rel_err(S_half.cpu(), states[2][0]) < 2e-5
    q, k, v, g, beta, gamma, _, _ = inputs
    o2, final, none = block_residual_attention_triton(q, k, v, g, beta, gamma, mode, CLIP, K**-0.5, None, False,
                                                      record=False)  # fmt: skip
    # not bitwise: without the record the compiler may fuse the multiply-adds differently
    assert final is None and none is None and rel_err(o2, o) < 1e-6
    with pytest.raises(ValueError, match="n >= 1"):
        block_residual_attention_triton(*(None if t is None else t[:, :0] for t in inputs[:6]), mode, CLIP, K**-0.5,
                                        None, True)  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_outputs_poisoned_with_nan_are_fully_written(mode, monkeypatch):
    """Every allocation made with torch.empty starts as NaN: an unwritten position would leak through."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        return real_empty(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", nan_empty)
    assert torch.empty(2).isnan().all()
    inputs = kernel_inputs(mode, 3, torch.float32, seed=12)
    o, (S, R), record = run_kernel(inputs, mode)
    written = [o, S, R, record.k, record.x, record.y]
    assert all(torch.isfinite(t).all() for t in written if t is not None)
    assert not record.g.isnan().any()  # (-inf: a reset)
    step_o, (step_S, step_R) = decode_step_triton(*(t[:, 0] if t is not None else None for t in inputs[:6]),
                                                  mode=mode, clip=CLIP, scale=0.5, state=tuple(inputs[6:]))  # fmt: skip
    assert all(torch.isfinite(t).all() for t in (step_o, step_S, step_R) if t is not None)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_state", [True, False])
def test_decode_step_kernel_matches_decode_step(mode, with_state):
    inputs = kernel_inputs(mode, 1, torch.float32, seed=13, initial_state=with_state)
    q, k, v, g, beta, gamma = (None if t is None else t[:, 0] for t in inputs[:6])  # the one token
    state = tuple(inputs[6:])
    kw = {"mode": mode, "clip": CLIP, "scale": K**-0.5, "state": state}
    saved = [None if s is None else s.clone() for s in state]
    o, (S, R) = decode_step_triton(q, k, v, g, beta, gamma, **kw)
    cpu = [None if t is None else t.cpu() for t in (q, k, v, g, beta, gamma, *state)]
    o_ref, (S_ref, R_ref) = decode_step(*cpu[:6], mode=mode, clip=CLIP, scale=K**-0.5, state=tuple(cpu[6:]))
    assert o.shape == (B, H, V) and o.dtype == q.dtype
    assert rel_err(o.cpu(), o_ref) < 2e-6 and rel_err(S.cpu(), S_ref) < 2e-6
    assert rel_err(None if R is None else R.cpu(), R_ref) < 2e-6
    assert all(s is None or torch.equal(s, t) for s, t in zip(state, saved)), "the states passed in are not modified"
    o64, _ = decode_step_triton(q, k, v, g, beta, gamma, **kw, out_dtype=torch.float64)
    assert o64.dtype == torch.float64 and torch.equal(o64, o.double())


def test_strided_inputs():
    """Views as the layer makes them (heads split from a wider projection, a non-unit last stride) read right."""
    mode = "rdn"
    inputs = kernel_inputs(mode, 4, torch.float32, seed=14)
    q, k, v, g, beta, gamma, S0, R0 = inputs
    wide = torch.cat([q, k], dim=-1)  # q, k as slices of one tensor: unit last stride, other strides larger
    q_view, k_view = wide[..., :K], wide[..., K:]
    v_t = v.transpose(-1, -2).contiguous().transpose(-1, -2)  # a non-unit last stride: copied by the launcher
    g_view = torch.stack([g, beta], dim=-1)[..., 0]
    assert not q_view.is_contiguous() and v_t.stride(-1) != 1 and not g_view.is_contiguous()
    o, (S, R), _ = run_kernel([q_view, k_view, v_t, g_view, beta, gamma, S0, R0], mode)
    o_ref, (S_ref, R_ref), _ = run_kernel(inputs, mode)
    assert torch.equal(o, o_ref) and torch.equal(S, S_ref) and torch.equal(R, R_ref)


# Compiles the kernel for an H100 (sm_90) without a GPU and without the interpreter: catches what only the
# compiler sees (loop-carried types, constexpr branches, fp64 lowering). argv[1]: a fresh Triton cache folder.
COMPILE_FOR_SM90 = """
import itertools, os, re, sys
os.environ["TRITON_INTERPRET"] = "0"
os.environ["TRITON_CACHE_DIR"] = sys.argv[1]
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hf_linattn.kernels.triton.triton_block import _block_decode_kernel as kernel

variants = 0
for (inputs, dt), (delta, residual), (state, record) in itertools.product(
        [("bf16", "fp32"), ("fp64", "fp64")], [(False, False), (True, False), (False, True), (True, True)],
        [(True, True), (False, False)]):
    pointers = dict(q=inputs, k=inputs, v=inputs, o=inputs, rec_g="fp64")
    signature = {}
    for name in kernel.arg_names:
        if name in ("scale", "clip"):
            signature[name] = "fp32"
        elif name in ("n", "H") or re.fullmatch(r"s[qkvgbca]_[bth]", name):  # sizes and strides
            signature[name] = "i32"
        elif name.isupper():  # K, V, BK, BV, DT and the switches
            signature[name] = "constexpr"
        else:
            signature[name] = "*" + pointers.get(name, "fp32" if inputs != "fp64" else "fp64")
    constexprs = dict(K=128, V=128, BK=128, BV=8, DT=tl.float64 if dt == "fp64" else tl.float32, DELTA=delta,
                      RESIDUAL=residual, HAS_S0=state, HAS_R0=state and residual, FINAL=state, RECORD=record,
                      GIVEN_ALPHA=dt == "fp64")
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
    assert ".entry" in compiled.asm["ptx"]
    variants += 1
print(variants)
"""


def test_kernel_compiles_for_an_h100_without_a_gpu(tmp_path):
    """Every mode, bf16 and fp64, with and without state and record: Triton IR -> PTX for sm_90."""
    import subprocess
    import sys

    env = {**os.environ, "TRITON_DEFAULT_FP_FUSION": "1"}
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90, str(tmp_path / "cache")], capture_output=True,
                            text=True, timeout=600, env=env)  # fmt: skip
    assert result.returncode == 0 and result.stdout.split()[-1] == "16", result.stderr[-3000:]
