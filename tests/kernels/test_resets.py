"""g = -inf (alpha = 0, the state is forgotten): the chunked path equals the reference exactly.

Resets are placed where the chunked algorithm is most likely to go wrong: first and last token,
both sides of a chunk boundary, several in one chunk, a whole chunk, and a random mix that
differs per batch row and head. Gradients are compared in fp64 against the reference's autograd.
"""

from __future__ import annotations

import pytest
import torch

from hf_linattn.kernels import MODES, chunked_residual_attention, is_residual, residual_attention

from .test_residual_attention import B, H, K, make_inputs, rel_err, run

T = 150  # chunks of 64: [0, 64), [64, 128), [128, 150)
NEG_INF = float("-inf")


def with_resets(g: torch.Tensor, pattern: str, seed: int = 0) -> torch.Tensor:
    """g with -inf at the positions of ``pattern`` (a copy; same dtype and grad setting)."""
    reset = torch.zeros(g.shape, dtype=torch.bool)
    T = g.shape[1]
    if pattern == "first":
        reset[:, 0] = True
    elif pattern == "last":
        reset[:, T - 1] = True
    elif pattern == "boundary":  # last token of chunk 0 and first of chunk 1
        reset[:, [63, 64]] = True
    elif pattern == "several":  # neighbours, and spread over one chunk
        reset[:, [3, 4, 10, 40, 90, 91, 127]] = True
    elif pattern == "whole_chunk":
        reset[:, 64:128] = True
    elif pattern == "mixed":  # ~10% at random, per batch row and head, plus the special places
        reset = torch.rand(g.shape, generator=torch.Generator().manual_seed(seed)) < 0.1
        reset[0, 0, 0] = reset[0, 63, 1] = reset[0, 64, 1] = True
        reset[1, : min(T, 64), 2] = True
    else:
        raise ValueError(pattern)
    return g.detach().masked_fill(reset, NEG_INF).requires_grad_(g.requires_grad)


PATTERNS = ["first", "last", "boundary", "several", "whole_chunk", "mixed"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("initial_state", [True, False])
def test_chunked_matches_reference_with_resets(mode, pattern, initial_state):
    inputs = make_inputs(mode, T=T, dtype=torch.float64, seed=30)
    inputs[3] = with_resets(inputs[3], pattern)
    if not initial_state:
        inputs[6] = inputs[7] = None
    o_ref, (S_ref, R_ref) = run(inputs, mode, "recurrent")
    o, (S, R) = run(inputs, mode, "torch")
    assert torch.isfinite(o_ref).all() and torch.isfinite(S_ref).all()
    assert rel_err(o, o_ref) < 1e-10
    assert rel_err(S, S_ref) < 1e-10
    if is_residual(mode):
        assert rel_err(R, R_ref) < 1e-10


@pytest.mark.parametrize("mode", MODES)
def test_reset_forgets_everything_before(mode):
    """From a reset on, outputs do not depend on the initial state or on earlier tokens."""
    inputs = make_inputs(mode, T=100, dtype=torch.float64, seed=31)
    inputs[3][:, 70] = NEG_INF
    o, (S, R) = run(inputs, mode, "torch")
    changed = list(inputs)
    changed[2] = torch.cat([changed[2][:, :70] * -2, changed[2][:, 70:]], 1)  # other values before the reset
    changed[6] = changed[6] + 1
    if is_residual(mode):
        changed[7] = changed[7] - 1
    o2, (S2, R2) = run(changed, mode, "torch")
    assert not torch.equal(o[:, :70], o2[:, :70])
    assert torch.equal(o[:, 70:], o2[:, 70:]) and torch.equal(S, S2)
    if is_residual(mode):
        assert torch.equal(R, R2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [1, 16, 48])
def test_other_chunk_sizes_with_resets(mode, chunk_size):
    q, k, v, g, beta, gamma, S0, R0 = make_inputs(mode, T=100, dtype=torch.float64, seed=32)
    g = with_resets(g, "mixed", seed=1)
    o_ref, (S_ref, _) = run([q, k, v, g, beta, gamma, S0, R0], mode, "recurrent")
    o, (S, _) = chunked_residual_attention(
        q, k, v, g, beta, gamma, mode, 1.0, K**-0.5, (S0, R0), True, chunk_size=chunk_size
    )
    assert rel_err(o, o_ref) < 1e-10 and rel_err(S, S_ref) < 1e-10


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_with_resets_is_finite(mode, dtype):
    inputs = make_inputs(mode, T=T, dtype=dtype, seed=33)
    inputs[3] = with_resets(inputs[3], "mixed")
    exact = make_inputs(mode, T=T, dtype=torch.float64, seed=33)
    exact[3] = with_resets(exact[3], "mixed")
    o_ref = run(exact, mode, "recurrent")[0]
    o, (S, _) = run(inputs, mode, "torch")
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert rel_err(o, o_ref) < (1e-5 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_with_resets_match_reference(mode):
    """Finite, and equal to the reference's, for every input (the -inf entries of g get 0 from both)."""
    T = 140
    names = ["q", "k", "v", "g", "beta", "gamma", "S0", "R0"]
    gen = torch.Generator().manual_seed(34)
    w_o = torch.randn(B, T, H, 24, generator=gen, dtype=torch.float64)
    w_s = torch.randn(B, H, K, 24, generator=gen, dtype=torch.float64)
    grads = {}
    for backend in ("recurrent", "torch"):
        inputs = make_inputs(mode, T=T, dtype=torch.float64, seed=35, requires_grad=True)
        inputs[3] = with_resets(inputs[3], "mixed", seed=2)
        o, (S, R) = run(inputs, mode, backend)
        loss = (o * w_o).sum() + (S * w_s).sum() + ((R * w_s.flip(-1)).sum() if R is not None else 0)
        loss.backward()
        grads[backend] = {n: t.grad for n, t in zip(names, inputs) if t is not None}
    reset = torch.isneginf(inputs[3].detach())
    for name, ref in grads["recurrent"].items():
        got = grads["torch"][name]
        assert torch.isfinite(ref).all() and torch.isfinite(got).all(), name
        assert ref.abs().sum() > 0, name
        assert rel_err(got, ref) < 1e-9, name
    assert (grads["torch"]["g"][reset] == 0).all() and (grads["recurrent"]["g"][reset] == 0).all()


def test_reset_at_every_token_reads_only_the_current_token():
    """All g = -inf: each token sees only its own write (o_t = beta_t (q_t . k_t) v_t for gla)."""
    q, k, v, g, beta, *_ = make_inputs("gla", T=70, dtype=torch.float64, seed=36)
    g = torch.full_like(g, NEG_INF)
    o, (S, _) = residual_attention(q, k, v, g, beta, mode="gla", output_final_state=True, backend="torch")
    expected = (beta * (q * k).sum(-1) * K**-0.5)[..., None] * v
    assert rel_err(o, expected) < 1e-12
    assert rel_err(S, beta[:, -1, :, None, None] * k[:, -1, :, :, None] * v[:, -1, :, None, :]) < 1e-12
