"""The chunked torch path against the token-by-token reference, for all four modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_linattn.kernels import MODES, is_delta, is_residual, residual_attention

B, H, K, V = 2, 3, 16, 24


def make_inputs(mode: str, T: int, dtype: torch.dtype, seed: int, value_scale: float = 3.0, requires_grad=False):
    """Fresh random inputs; values large enough that the clip is active for a good share of errors."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = F.normalize(rnd(B, T, H, K), dim=-1)
    k = F.normalize(rnd(B, T, H, K), dim=-1)
    v = rnd(B, T, H, V) * value_scale
    g = -torch.rand(B, T, H, generator=gen, dtype=torch.float64) * 0.3
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    gamma = torch.rand(B, T, H, generator=gen, dtype=torch.float64) * 0.9 + 0.05 if is_residual(mode) else None
    S0 = rnd(B, H, K, V)
    R0 = rnd(B, H, K, V) if is_residual(mode) else None
    tensors = [q, k, v, g, beta, gamma, S0, R0]
    out = [None if t is None else t.to(dtype).requires_grad_(requires_grad) for t in tensors]
    return out


def run(inputs, mode, backend, **kw):
    q, k, v, g, beta, gamma, S0, R0 = inputs
    return residual_attention(
        q, k, v, g, beta, gamma, mode=mode, initial_state=(S0, R0), output_final_state=True, backend=backend, **kw
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def base_errors(inputs, mode) -> torch.Tensor:
    """e_t = v_t - (alpha_t S_{t-1})^T k_t of the base state, computed here independently of the library."""
    q, k, v, g, beta, _, S, _ = (None if t is None else t.detach().double() for t in inputs)
    errors = []
    for t in range(q.shape[1]):
        S = g[:, t].exp()[..., None, None] * S
        e = v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        written = e if is_delta(mode) else v[:, t]
        S = S + beta[:, t, :, None, None] * k[:, t, :, :, None] * written[..., None, :]
        errors.append(e)
    return torch.stack(errors, 1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_chunked_matches_recurrent(mode, dtype, tol):
    inputs = make_inputs(mode, T=150, dtype=dtype, seed=1)  # 150: two full chunks and a partial one
    o_ref, (S_ref, R_ref) = run(inputs, mode, "recurrent")
    o, (S, R) = run(inputs, mode, "torch")
    assert o.dtype == dtype and S.dtype == dtype
    assert rel_err(o, o_ref) < tol
    assert rel_err(S, S_ref) < tol
    if is_residual(mode):
        assert R.dtype == dtype and rel_err(R, R_ref) < tol
        share_clipped = (base_errors(inputs, mode).abs() > 1.0).double().mean().item()
        assert share_clipped > 0.3, f"the clip must be active for the test to mean something ({share_clipped:.2f})"
    else:
        assert R is None and R_ref is None


@pytest.mark.parametrize("mode", MODES)
def test_half_precision_inputs(mode):
    """bf16 inputs: states stay fp32, output comes back in bf16, both paths agree to bf16 precision."""
    inputs = make_inputs(mode, T=70, dtype=torch.bfloat16, seed=2)
    o_ref, (S_ref, _) = run(inputs, mode, "recurrent")
    o, (S, _) = run(inputs, mode, "torch")
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    assert rel_err(o, o_ref) < 1e-2
    assert rel_err(S, S_ref) < 1e-4
    exact = run(make_inputs(mode, T=70, dtype=torch.float64, seed=2), mode, "recurrent")[0]
    assert rel_err(o, exact) < 3e-2


@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_reference(mode):
    T = 80
    grads = {}
    names = ["q", "k", "v", "g", "beta", "gamma", "S0", "R0"]
    gen = torch.Generator().manual_seed(3)
    w_o = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    w_s = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    for backend in ("recurrent", "torch"):
        inputs = make_inputs(mode, T=T, dtype=torch.float64, seed=4, requires_grad=True)
        o, (S, R) = run(inputs, mode, backend)
        loss = (o * w_o).sum() + (S * w_s).sum() + ((R * w_s.flip(-1)).sum() if R is not None else 0)
        loss.backward()
        grads[backend] = {n: t.grad for n, t in zip(names, inputs) if t is not None}
    assert set(grads["torch"]) == set(grads["recurrent"])
    assert ("gamma" in grads["torch"]) == is_residual(mode)
    for name, ref in grads["recurrent"].items():
        assert ref.abs().sum() > 0, name
        assert rel_err(grads["torch"][name], ref) < 1e-9, name


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["torch", "recurrent"])
@pytest.mark.parametrize("split", [1, 64, 97])
def test_state_passing_equals_whole_sequence(mode, backend, split):
    inputs = make_inputs(mode, T=130, dtype=torch.float64, seed=5)
    o_all, (S_all, R_all) = run(inputs, mode, backend)
    q, k, v, g, beta, gamma, S0, R0 = inputs

    def part(sl, state):
        return residual_attention(
            q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], gamma[:, sl] if gamma is not None else None,
            mode=mode, initial_state=state, output_final_state=True, backend=backend,
        )  # fmt: skip

    o1, state = part(slice(0, split), (S0, R0))
    o2, (S, R) = part(slice(split, None), state)
    assert rel_err(torch.cat([o1, o2], 1), o_all) < 1e-12
    assert rel_err(S, S_all) < 1e-12
    if is_residual(mode):
        assert rel_err(R, R_all) < 1e-12


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["torch", "recurrent"])
def test_outputs_poisoned_with_nan_are_fully_written(mode, backend, monkeypatch):
    """Every allocation made with torch.empty starts as NaN: an unwritten position would leak through."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        return real_empty(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", nan_empty)
    assert torch.empty(2).isnan().all()
    inputs = make_inputs(mode, T=100, dtype=torch.float32, seed=6)
    o, (S, R) = run(inputs, mode, backend)
    assert o.shape == (B, 100, H, V)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    if R is not None:
        assert torch.isfinite(R).all()


@pytest.mark.parametrize("mode", MODES)
def test_no_initial_state_equals_zero_state(mode):
    inputs = make_inputs(mode, T=40, dtype=torch.float64, seed=7)
    q, k, v, g, beta, gamma, S0, R0 = inputs
    zeros = (torch.zeros_like(S0), torch.zeros_like(R0) if R0 is not None else None)
    for backend in ("torch", "recurrent"):
        o_none, _ = residual_attention(q, k, v, g, beta, gamma, mode=mode, backend=backend)
        o_zero, _ = residual_attention(q, k, v, g, beta, gamma, mode=mode, initial_state=zeros, backend=backend)
        assert rel_err(o_none, o_zero) < 1e-14


def test_clip_and_scale_are_used():
    inputs = make_inputs("rdn", T=30, dtype=torch.float64, seed=8)
    base = run(inputs, "rdn", "torch")[0]
    assert rel_err(run(inputs, "rdn", "torch", clip=0.1)[0], base) > 1e-3
    assert rel_err(run(inputs, "rdn", "torch", scale=0.5)[0], base) > 1e-3
    assert rel_err(run(inputs, "rdn", "torch", clip=0.1)[0], run(inputs, "rdn", "recurrent", clip=0.1)[0]) < 1e-10


def test_auto_backend_is_torch_on_cpu(monkeypatch):
    import hf_linattn.kernels.ops as ops

    calls = []
    real = ops.chunked_residual_attention
    monkeypatch.setattr(ops, "chunked_residual_attention", lambda *a: calls.append(1) or real(*a))
    q, k, v, g, beta, _, *_ = make_inputs("gdn", T=10, dtype=torch.float32, seed=9)
    residual_attention(q, k, v, g, beta, mode="gdn")
    assert calls == [1]


@pytest.mark.parametrize("mode", MODES)
def test_triton_backend_through_the_public_entry_point(mode):
    """backend="triton" (the interpreter here, compiled on a GPU) equals the torch path, states included."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: TRITON_INTERPRET=1 (tests/conftest.py)
    inputs = make_inputs(mode, T=21, dtype=torch.float32, seed=10)[:6]
    q, k, v, g, beta, gamma = (None if x is None else x.to(device) for x in inputs)
    want, want_state = residual_attention(q, k, v, g, beta, gamma, mode=mode, clip=0.3, output_final_state=True,
                                          backend="torch")  # fmt: skip
    got, got_state = residual_attention(q, k, v, g, beta, gamma, mode=mode, clip=0.3, output_final_state=True,
                                        backend="triton")  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_state, want_state):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mode": "xla"}, "unknown mode"),
        ({"backend": "cuda"}, "unknown backend"),
        ({"gamma": None}, "gamma must be"),
        ({"mode": "gdn"}, "gamma must be None"),
        ({"clip": 0.0}, "clip must be > 0"),
        ({"k": torch.zeros(B, 4, H, K + 1)}, "q and k must both be"),
        ({"v": torch.zeros(B, 5, H, V)}, "v must be"),
        ({"beta": torch.zeros(B, 4)}, "beta must be"),
        ({"initial_state": (torch.zeros(B, H, K, K), None)}, "S0 must be"),
        ({"initial_state": torch.zeros(B, H, K, V)}, "initial_state must be a pair"),
    ],
)
def test_bad_arguments_get_one_clear_error(change, message):
    q, k, v, g, beta, gamma, *_ = make_inputs("rdn", T=4, dtype=torch.float32, seed=11)
    kwargs = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "gamma": gamma, "mode": "rdn"} | change
    with pytest.raises(ValueError, match=message):
        residual_attention(**kwargs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [1, 16, 48, 128])
def test_other_chunk_sizes_match_reference(mode, chunk_size):
    """The chunked algorithm is exact for any chunk size, including ones that are no power of two."""
    from hf_linattn.kernels import chunked_residual_attention

    q, k, v, g, beta, gamma, S0, R0 = make_inputs(mode, T=100, dtype=torch.float64, seed=12)
    o_ref, (S_ref, _) = run([q, k, v, g, beta, gamma, S0, R0], mode, "recurrent")
    o, (S, _) = chunked_residual_attention(
        q, k, v, g, beta, gamma, mode, 1.0, K**-0.5, (S0, R0), True, chunk_size=chunk_size
    )
    assert rel_err(o, o_ref) < 1e-10 and rel_err(S, S_ref) < 1e-10
