"""The Triton chunked kernels (``chunk_residual_attention_triton``) against the token-by-token reference.

On CPU they run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), at tiny
shapes: T = 40 with chunks of 16, so the last chunk is partial. On a CUDA machine the same file
runs compiled (``TRITON_INTERPRET=0 python -m pytest tests/kernels/test_triton_chunk.py``) and adds
realistic sizes against the torch chunked path. The clip is small (values ~3, clip 0.5) so that
it bites; a test checks that it does.
"""

from __future__ import annotations

import itertools

import pytest

pytest.importorskip("triton")

import torch
import torch.nn.functional as F

from hf_linattn.kernels import MODES, chunked_residual_attention, is_residual, recurrent_residual_attention
from hf_linattn.kernels.triton.triton_chunk import chunk_residual_attention_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CLIP = 0.5
# fp32 inputs: the interpreter computes in numpy fp32; compiled kernels use approximate exp2
TOL_FP32 = 1e-5 if DEVICE == "cpu" else 1e-4
TOL_GRAD = 1e-5 if DEVICE == "cpu" else 1e-4  # measured ~2.5e-7 in the interpreter
NAMES = ("q", "k", "v", "g", "beta", "gamma", "S0", "R0")
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="realistic sizes only compiled on a GPU")


def make_inputs(mode, B=2, T=40, H=2, K=16, V=16, seed=0, N=None):
    """fp64 master inputs on DEVICE: unit q, k; values ~3; g in [-0.3, 0]; states for N (default B) rows."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def unit(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    N = B if N is None else N
    residual = is_residual(mode)
    x = {
        "q": F.normalize(rnd(B, T, H, K), dim=-1),
        "k": F.normalize(rnd(B, T, H, K), dim=-1),
        "v": rnd(B, T, H, V) * 3,
        "g": -unit(B, T, H) * 0.3,
        "beta": unit(B, T, H) * 0.9 + 0.05,
        "gamma": unit(B, T, H) * 0.9 + 0.05 if residual else None,
        "S0": rnd(N, H, K, V),
        "R0": rnd(N, H, K, V) if residual else None,
    }
    return {n: None if t is None else t.to(DEVICE) for n, t in x.items()}


def cast(x, dtype, requires_grad=False):
    return {n: None if t is None else t.to(dtype).detach().requires_grad_(requires_grad) for n, t in x.items()}


def call(fn, x, mode, **kw):
    """o, S, R of ``fn`` (same positional contract for all three paths)."""
    args = [x[n] for n in ("q", "k", "v", "g", "beta", "gamma")]
    o, (S, R) = fn(*args, mode, CLIP, x["q"].shape[-1] ** -0.5, (x["S0"], x["R0"]), True, **kw)
    return o, S, R


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_close(got, ref, tol):
    for name, a, b in zip(("o", "S", "R"), got, ref):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.isfinite(a).all(), name
            assert rel_err(a, b) < tol, (name, rel_err(a, b))


def grads_of(run, x, seed=1):
    """Gradients of a fixed random linear function of ``run(x)`` = (o, S, R) with respect to every input."""
    gen = torch.Generator().manual_seed(seed)
    loss = sum(
        (t.double() * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device)).sum()
        for t in run(x)
        if t is not None
    )
    leaves = [n for n in NAMES if x[n] is not None]
    return dict(zip(leaves, torch.autograd.grad(loss, [x[n] for n in leaves])))


def path(fn, mode, **kw):
    """x -> (o, S, R) of ``fn``."""
    return lambda x: call(fn, x, mode, **kw)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_forward_matches_reference_fp32(mode, chunk):
    x = make_inputs(mode, seed=1)
    ref = call(recurrent_residual_attention, x, mode)
    got = call(chunk_residual_attention_triton, cast(x, torch.float32), mode, chunk_size=chunk)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    check_close(got, ref, TOL_FP32)
    if is_residual(mode):  # the clip must bite for the comparison to mean something
        unclipped = recurrent_residual_attention(
            *[x[n] for n in ("q", "k", "v", "g", "beta", "gamma")], mode, 1e6, 0.25, (x["S0"], x["R0"]), False
        )[0]
        assert rel_err(unclipped, ref[0]) > 1e-2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_half_inputs(mode, dtype):
    """Half inputs: compared with the reference on the same (upcast) values; o comes back in the input dtype."""
    x = cast(make_inputs(mode, seed=2), dtype)
    ref = call(recurrent_residual_attention, cast(x, torch.float64), mode)
    o, S, R = call(chunk_residual_attention_triton, x, mode, chunk_size=16)
    assert o.dtype == dtype and S.dtype == torch.float32
    # o is rounded to the input dtype; on the GPU, products of half inputs are tf32
    tol_o = 1e-2 if dtype == torch.bfloat16 else (2e-3 if DEVICE == "cpu" else 5e-3)
    assert rel_err(o, ref[0]) < tol_o
    tol_state = TOL_FP32 if DEVICE == "cpu" else 5e-3  # tf32 products on the GPU
    check_close((S, R), ref[1:], tol_state)


@pytest.mark.parametrize("mode", MODES)
def test_value_tiles_and_odd_sizes(mode):
    """K = 20 (padded key tile), V = 80 (value tiles of 64 forward, 32 backward, the last partial), T = 23."""
    x = make_inputs(mode, B=1, T=23, H=1, K=20, V=80, seed=3)
    triton_path = path(chunk_residual_attention_triton, mode, chunk_size=32)
    check_close(triton_path(cast(x, torch.float32)), call(recurrent_residual_attention, x, mode), TOL_FP32)
    ref = grads_of(path(recurrent_residual_attention, mode), cast(x, torch.float64, True))
    got = grads_of(triton_path, cast(x, torch.float32, True))
    for name, r in ref.items():
        assert rel_err(got[name], r) < TOL_GRAD, (name, rel_err(got[name], r))


@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_reference(mode):
    x = make_inputs(mode, seed=4)
    ref = grads_of(path(recurrent_residual_attention, mode), cast(x, torch.float64, True))
    got = grads_of(path(chunk_residual_attention_triton, mode, chunk_size=16), cast(x, torch.float32, True))
    assert set(got) == set(ref) == {n for n in NAMES if x[n] is not None}
    for name, r in ref.items():
        assert r.abs().sum() > 0, name
        assert got[name].dtype == torch.float32, name
        assert rel_err(got[name], r) < TOL_GRAD, (name, rel_err(got[name], r))


@pytest.mark.parametrize("mode", ["gla", "rdn"])
def test_gradients_half_inputs(mode):
    """bf16 inputs: gradients come back in bf16 and match the reference on the same (upcast) values."""
    x = cast(make_inputs(mode, seed=10), torch.bfloat16)
    ref = grads_of(path(recurrent_residual_attention, mode), cast(x, torch.float64, True))
    got = grads_of(path(chunk_residual_attention_triton, mode, chunk_size=16), cast(x, torch.bfloat16, True))
    for name, r in ref.items():
        assert got[name].dtype == torch.bfloat16, name
        assert rel_err(got[name], r) < 1e-2, (name, rel_err(got[name], r))


def test_backward_twice_with_retained_graph():
    x = cast(make_inputs("rdn", seed=14), torch.float32, True)
    o, S, R = call(chunk_residual_attention_triton, x, "rdn", chunk_size=16)
    first = torch.autograd.grad(o.sum() + S.sum() + R.sum(), x["k"], retain_graph=True)[0]
    second = torch.autograd.grad(o.sum() + S.sum() + R.sum(), x["k"])[0]
    assert torch.equal(first, second) and first.abs().sum() > 0


def test_gradient_of_one_input_only():
    """Only q needs a gradient (states are still stored for the backward); the others get none."""
    x = cast(make_inputs("rdn", seed=11), torch.float32)
    x["q"].requires_grad_(True)
    o, S, R = call(chunk_residual_attention_triton, x, "rdn", chunk_size=16)
    (o.sum() + S.sum() + R.sum()).backward()
    assert all(x[n].grad is None for n in NAMES[1:])
    ref = cast(x, torch.float64)
    ref["q"].requires_grad_(True)
    o, S, R = call(recurrent_residual_attention, ref, "rdn")
    (o.sum() + S.sum() + R.sum()).backward()
    assert rel_err(x["q"].grad, ref["q"].grad) < TOL_GRAD


@pytest.mark.parametrize("mode", MODES)
def test_resets_are_exact(mode):
    """g = -inf at the first token, at both sides of a chunk boundary, inside a chunk and at the last token."""
    x = make_inputs(mode, seed=5)
    x["g"][:, [0, 15, 16, 23, 39], 0] = float("-inf")
    x["g"][1, 17:30, 1] = float("-inf")
    ref = call(recurrent_residual_attention, x, mode)
    got = call(chunk_residual_attention_triton, cast(x, torch.float32), mode, chunk_size=16)
    check_close(got, ref, TOL_FP32)
    ref_grads = grads_of(path(recurrent_residual_attention, mode), cast(x, torch.float64, True))
    got_grads = grads_of(path(chunk_residual_attention_triton, mode, chunk_size=16), cast(x, torch.float32, True))
    for name, r in ref_grads.items():
        assert torch.isfinite(got_grads[name]).all(), name
        assert rel_err(got_grads[name], r) < TOL_GRAD, (name, rel_err(got_grads[name], r))
    assert (got_grads["g"][torch.isneginf(x["g"])] == 0).all()


def separate_calls(x, bounds, mode):
    """o, S, R of the reference run on each packed sequence alone, joined back into the packed layout."""
    parts = []
    for n, (a, b) in enumerate(itertools.pairwise(bounds)):
        part = {name: None if x[name] is None else x[name][:, a:b] for name in NAMES[:6]}
        part |= {name: None if x[name] is None else x[name][n : n + 1] for name in NAMES[6:]}
        parts.append(call(recurrent_residual_attention, part, mode))
    o, S, R = zip(*parts)
    return torch.cat(o, 1), torch.cat(S), None if R[0] is None else torch.cat(R)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_varlen_equals_separate_sequences(mode, index_dtype):
    """Packed sequences of lengths 7, 0, 33, 17 (batch 1), each from its own initial state."""
    bounds = [0, 7, 7, 40, 57]
    x = make_inputs(mode, B=1, T=bounds[-1], seed=6, N=len(bounds) - 1)
    cu = torch.tensor(bounds, dtype=index_dtype, device=DEVICE)
    got = call(chunk_residual_attention_triton, cast(x, torch.float32), mode, cu_seqlens=cu, chunk_size=16)
    assert got[0].shape == x["v"].shape and got[1].shape == x["S0"].shape
    check_close(got, separate_calls(x, bounds, mode), TOL_FP32)
    triton_path = path(chunk_residual_attention_triton, mode, cu_seqlens=cu, chunk_size=16)
    got_grads = grads_of(triton_path, cast(x, torch.float32, True))
    ref_grads = grads_of(lambda x: separate_calls(x, bounds, mode), cast(x, torch.float64, True))
    for name, r in ref_grads.items():
        assert rel_err(got_grads[name], r) < TOL_GRAD, (name, rel_err(got_grads[name], r))


@pytest.mark.parametrize("mode", MODES)
def test_outputs_poisoned_with_nan_are_fully_written(mode, monkeypatch):
    """Every fresh allocation starts as NaN: a position the kernels never write would leak through."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: real_empty_like(*a, **kw).fill_(float("nan")))
    assert torch.empty(2).isnan().all() and torch.empty_like(torch.ones(2)).isnan().all()
    x = cast(make_inputs(mode, seed=7, V=40), torch.float32, True)  # V = 40: partial value tiles
    o, S, R = call(chunk_residual_attention_triton, x, mode, chunk_size=16)
    for t in (o, S, R):
        assert t is None or torch.isfinite(t).all()
    for name, grad in grads_of(path(chunk_residual_attention_triton, mode, chunk_size=16), x).items():
        assert torch.isfinite(grad).all(), name


def test_varlen_arguments_are_checked():
    x = cast(make_inputs("rdn", B=1, seed=13), torch.float32)
    cu = torch.tensor([0, 10, 40], device=DEVICE)
    with pytest.raises(ValueError, match="one row per sequence"):
        call(chunk_residual_attention_triton, x, "rdn", cu_seqlens=cu)
    with pytest.raises(ValueError, match="int32/int64"):
        call(chunk_residual_attention_triton, x, "rdn", cu_seqlens=cu.float())
    x2 = cast(make_inputs("rdn", B=2, seed=13), torch.float32)
    with pytest.raises(ValueError, match="batch of 1"):
        call(chunk_residual_attention_triton, x2, "rdn", cu_seqlens=torch.tensor([0, 40, 80], device=DEVICE))


def test_no_grad_stores_no_states(monkeypatch):
    """Under torch.no_grad the forward keeps no per-chunk states, even for inputs that require grad."""
    import hf_linattn.kernels.triton.triton_chunk as module

    seen = []
    real = module.chunk_forward
    monkeypatch.setattr(module, "chunk_forward", lambda *a, **kw: seen.append(kw["store_states"]) or real(*a, **kw))
    x = cast(make_inputs("rdn", seed=12), torch.float32, True)
    with torch.no_grad():
        call(chunk_residual_attention_triton, x, "rdn", chunk_size=16)
    call(chunk_residual_attention_triton, x, "rdn", chunk_size=16)
    assert seen == [False, True]


@pytest.mark.parametrize("mode", ["gdn", "rdn"])
def test_without_states(mode):
    """No initial state means zero states; output_final_state=False returns None."""
    x = cast(make_inputs(mode, seed=8), torch.float32)
    args = [x[n] for n in ("q", "k", "v", "g", "beta", "gamma")]
    o, final = chunk_residual_attention_triton(*args, mode, CLIP, 0.25, None, False, chunk_size=16)
    assert final is None
    zeros = (torch.zeros_like(x["S0"]), None if x["R0"] is None else torch.zeros_like(x["R0"]))
    o_ref, _ = recurrent_residual_attention(*args, mode, CLIP, 0.25, zeros, False)
    assert rel_err(o, o_ref) < TOL_FP32


@needs_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("K", "V"), [(64, 64), (128, 128)])
def test_realistic_sizes_match_torch_chunked(mode, K, V):
    """T = 300 (chunks of 64, the last partial), H = 4, bf16 inputs, against the torch chunked path."""
    x = cast(make_inputs(mode, B=2, T=300, H=4, K=K, V=V, seed=9), torch.bfloat16)
    x["g"][0, 100, 1] = float("-inf")
    ref = call(chunked_residual_attention, cast(x, torch.float32), mode)
    o, S, R = call(chunk_residual_attention_triton, x, mode)
    assert o.dtype == torch.bfloat16
    assert rel_err(o, ref[0]) < 1e-2
    check_close((S, R), ref[1:], 5e-3)
    x32 = cast(x, torch.float32)
    check_close(call(chunk_residual_attention_triton, x32, mode), call(chunked_residual_attention, x32, mode), 1e-4)


@needs_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_realistic_gradients_match_torch_chunked(mode, dtype):
    """T = 300, H = 4, K = V = 64: gradients of every input against the torch chunked path in fp32."""
    x = cast(make_inputs(mode, B=2, T=300, H=4, K=64, V=64, seed=12), dtype)
    x["g"][1, 200, 2] = float("-inf")
    ref = grads_of(path(chunked_residual_attention, mode), cast(x, torch.float32, True))
    got = grads_of(path(chunk_residual_attention_triton, mode), cast(x, dtype, True))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, r in ref.items():
        assert torch.isfinite(got[name]).all(), name
        assert rel_err(got[name], r) < tol, (name, rel_err(got[name], r))
