"""The block op (decoding verification, cache rollback) against the token-by-token reference, all four modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_linattn.kernels import MODES, is_residual
from hf_linattn.kernels.block import _log_decays, block_residual_attention
from hf_linattn.kernels.recurrent import recurrent_residual_attention

B, H, K, V = 3, 2, 16, 12  # K != V catches transposed states
CLIP = 0.1
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def make_inputs(mode: str, n: int, dtype: torch.dtype, seed: int, initial_state: bool = True):
    """Fresh random inputs as the layer makes them; small clip (most errors clipped) and some resets (g = -inf)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = F.normalize(rnd(B, n, H, K), dim=-1)
    k = F.normalize(rnd(B, n, H, K), dim=-1)
    v = rnd(B, n, H, V) * 0.2
    g = F.logsigmoid(rnd(B, n, H) * 2 + 3)  # alpha mostly 0.8..1, a few near 0
    g = g.masked_fill(torch.rand(B, n, H, generator=gen) < 0.03, float("-inf"))
    g[0, 0, 0] = float("-inf")  # a reset on the first token
    g[1, n // 2, 1] = float("-inf")  # and one inside the block
    g[2, n - 1, 0] = 0.0  # alpha = 1
    beta = torch.sigmoid(rnd(B, n, H))
    gamma = torch.sigmoid(rnd(B, n, H)) if is_residual(mode) else None
    S0 = rnd(B, H, K, V) * 0.2 if initial_state else None
    R0 = rnd(B, H, K, V) * 0.2 if initial_state and is_residual(mode) else None
    return [None if t is None else t.to(dtype) for t in (q, k, v, g, beta, gamma, S0, R0)]


def reference(inputs, mode: str):
    """o, the base errors e and the list of (S, R) after 0..n tokens, from the fp64 recurrence."""
    q, k, v, g, beta, gamma, S0, R0 = (None if t is None else t.double() for t in inputs)
    steps = []
    o, _ = recurrent_residual_attention(
        q, k, v, g, beta, gamma, mode, CLIP, K**-0.5, (S0, R0), False, step_states=steps
    )
    zeros = torch.zeros(B, H, K, V, dtype=torch.float64)
    first = (zeros if S0 is None else S0, (zeros if R0 is None else R0) if is_residual(mode) else None)
    states = [first, *steps]
    # e_t = v_t - (alpha_t S_{t-1})^T k_t, from the logged states
    S_prev = torch.stack([s for s, _ in states[:-1]], 1)  # [B, n, H, K, V]
    e = v - torch.einsum("bthk,bthkv->bthv", k, g.exp()[..., None, None] * S_prev)
    return o, e, states


def block(inputs, mode: str, **kw):
    q, k, v, g, beta, gamma, S0, R0 = inputs
    state = (S0, R0) if S0 is not None else None
    return block_residual_attention(q, k, v, g, beta, gamma, mode, CLIP, K**-0.5, state, True, **kw)


def rel_err(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:
        assert a is None and b is None
        return 0.0
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_states(record, states, mode, tol):
    n = len(states) - 1
    for j in range(n + 1):
        S, R = record.state_after(j)
        assert rel_err(S, states[j][0]) < tol, j
        assert rel_err(R, states[j][1]) < tol, j
    # one prefix length per batch row
    lengths = torch.tensor([n, 0, n // 2])
    S, R = record.state_after(lengths)
    for row, j in enumerate(lengths.tolist()):
        assert rel_err(S[row], states[j][0][row]) < tol
        if is_residual(mode):
            assert rel_err(R[row], states[j][1][row]) < tol


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 64, 70])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("initial_state", [True, False])
def test_block_matches_reference(mode, n, dtype, initial_state):
    tol = TOL[dtype]
    inputs = make_inputs(mode, n, dtype, seed=1000 * n + 7, initial_state=initial_state)
    o_ref, e_ref, states = reference(inputs, mode)
    if is_residual(mode) and n >= 7:
        clipped = (e_ref.abs() > CLIP).double().mean().item()
        assert 0.2 < clipped < 0.95, f"the clip must be active on a good share of errors ({clipped:.2f})"
    o, (S, R), record = block(inputs, mode)
    assert o.dtype == dtype and o.shape == (B, n, H, V) and o.is_contiguous()
    assert S.dtype == dtype and len(record) == n
    assert rel_err(o, o_ref) < tol
    assert rel_err(S, states[-1][0]) < tol
    assert rel_err(R, states[-1][1]) < tol
    check_states(record, states, mode, tol)


@pytest.mark.parametrize("mode", MODES)
def test_small_chunks(mode):
    """Several chunks, resets across chunk boundaries: the chunk loop passes the states on exactly."""
    inputs = make_inputs(mode, 21, torch.float64, seed=5)  # chunks of 5, 5, 5, 5, 1
    inputs[3][:, 5::5] = float("-inf")  # resets on the first token of every later chunk
    o_ref, _, states = reference(inputs, mode)
    o, (S, R), record = block(inputs, mode, chunk_size=5)
    assert rel_err(o, o_ref) < 1e-10
    assert rel_err(S, states[-1][0]) < 1e-10 and rel_err(R, states[-1][1]) < 1e-10
    check_states(record, states, mode, 1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_select_and_nbytes(mode):
    n = 16
    inputs = make_inputs(mode, n, torch.float64, seed=3)
    _, _, states = reference(inputs, mode)
    _, _, record = block(inputs, mode)
    kept = record.select(torch.tensor([2, 0]))
    S, R = kept.state_after(torch.tensor([5, n]))
    assert rel_err(S[0], states[5][0][2]) < 1e-10 and rel_err(S[1], states[n][0][0]) < 1e-10
    if is_residual(mode):
        assert rel_err(R[0], states[5][1][2]) < 1e-10 and rel_err(R[1], states[n][1][0]) < 1e-10
    one = record.select(1)
    assert rel_err(one.state_after(3)[0], states[3][0][1:2]) < 1e-10
    # O(n (K + V)) per head plus the entering states, not one K x V state per token
    n_states = 2 if is_residual(mode) else 1
    writes = B * H * n * (K + n_states * V) * 8
    decays = B * H * n * 8  # fp64 log-decays
    assert record.nbytes() == n_states * B * H * K * V * 8 + writes + decays
    assert one.nbytes() * B == record.nbytes()


@pytest.mark.parametrize("mode", MODES)
def test_half_precision_inputs(mode):
    """bf16 inputs: output in bf16, states in fp32, as the fp32 computation of the same inputs."""
    inputs = make_inputs(mode, 16, torch.bfloat16, seed=4)
    o, (S, _), record = block(inputs, mode)
    o32, (S32, _), _ = block([None if t is None else t.float() for t in inputs], mode)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    assert record.state_after(16)[0].dtype == torch.float32
    assert rel_err(o, o32) < 1e-2 and rel_err(S, S32) < 1e-6


def test_inputs_and_states_untouched():
    """n = 1 without a state: e is v itself; nothing may write into the caller's tensors."""
    for mode in MODES:
        for n, init in [(1, False), (1, True), (5, True)]:
            inputs = make_inputs(mode, n, torch.float32, seed=6, initial_state=init)
            copies = [None if t is None else t.clone() for t in inputs]
            block(inputs, mode)
            for a, b in zip(inputs, copies):
                assert (a is None and b is None) or torch.equal(a, b)


def test_guards():
    inputs = make_inputs("rdn", 4, torch.float64, seed=7)
    _, _, record = block(inputs, "rdn")
    with pytest.raises(ValueError):
        record.state_after(5)
    with pytest.raises(ValueError):
        record.state_after(torch.tensor([0, -1, 2]))
    inputs[6].add_(1.0)  # the cache changed S0 in place: the record can no longer rebuild states
    with pytest.raises(RuntimeError):
        record.state_after(2)


@pytest.mark.parametrize("mode", MODES)
def test_without_resets(mode):
    """Blocks without any reset take the path without segment masks."""
    inputs = make_inputs(mode, 8, torch.float64, seed=8)
    inputs[3] = inputs[3].clamp_min(-5.0)
    o_ref, _, states = reference(inputs, mode)
    o, _, record = block(inputs, mode)
    assert _log_decays(record.g)[1] is None
    assert rel_err(o, o_ref) < 1e-10
    check_states(record, states, mode, 1e-10)


@pytest.mark.parametrize("mode", ["rla", "rdn"])
def test_residual_from_base_state_only(mode):
    """initial_state (S0, None) in a residual mode: R starts from zeros."""
    inputs = make_inputs(mode, 7, torch.float64, seed=9)
    inputs[7] = None
    o_ref, _, states = reference(inputs, mode)
    o, (_, R), record = block(inputs, mode)
    assert rel_err(o, o_ref) < 1e-10 and rel_err(R, states[-1][1]) < 1e-10
    check_states(record, states, mode, 1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_reference(mode):
    """Not needed for decoding, but autograd through the block op gives the reference's gradients."""
    n = 5
    inputs = [None if t is None else t.requires_grad_() for t in make_inputs(mode, n, torch.float64, seed=10)]
    o, (S, _), record = block(inputs, mode)
    (o.sum() + S.sum() + record.state_after(2)[0].sum()).backward()
    ref_inputs = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    q, k, v, g, beta, gamma, S0, R0 = ref_inputs
    steps = []
    o_ref, _ = recurrent_residual_attention(
        q, k, v, g, beta, gamma, mode, CLIP, K**-0.5, (S0, R0), False, step_states=steps
    )
    (o_ref.sum() + steps[-1][0].sum() + steps[1][0].sum()).backward()
    for a, b in zip(inputs, ref_inputs):
        if a is not None:
            assert torch.isfinite(a.grad).all() and rel_err(a.grad, b.grad) < 1e-10
