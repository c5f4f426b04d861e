"""Chunked (chunkwise-parallel) residual linear attention in pure PyTorch: the CPU path.

Per chunk of C tokens with cumulative log-decay b_t (within the chunk) and entering state S0,
the base recurrence of the spec unrolls to

    e   = U - W S0                      (the error v_t - S~_t^T k_t for every t at once)
    x_t = beta_t * (e_t if delta else v_t)            (what the token writes)
    o   = (Gamma Q) S0 + (Q K^T * D) x                (D_ts = exp(b_t - b_s), s <= t)
    S   = exp(b_C) S0 + (K * exp(b_C - b))^T x

with A = strictly-lower (K K^T * D) and, for the delta rule, U, W from the unit-lower system
(I + A diag(beta)) [U | W] = [V | Gamma K]  (the WY/UT transform, solved for e directly rather
than for beta * e, so a small beta never divides). For gla, U = V - A diag(beta) V and
W = Gamma K. Residual modes run a second pass of the same shape on the clipped error r with
write strength gamma and its own state R (``_pass`` is called twice).

Everything that does not depend on the entering states (decays, Q K^T, K K^T, the triangular
inverses, U, W) is computed for all chunks in one batched call, and so are e and the outputs
once every chunk's entering state is known (they are kept: N x K x V per head, about the size
of q, k, v at C = 32, half that at C = 64). The Python loop over chunks only advances the state: two small matmuls
per chunk for the delta rule; for gla, whose writes do not depend on the state, one multiply-add.
Every exponent is <= 0, so nothing overflows. g = -inf (alpha = 0) is an exact state reset:
decays that span it are exactly 0 (see the decay block). Differentiable by autograd. This file
imports nothing from hf_linattn (it is also checkpoint remote code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import state_dtype
from .modes import is_delta, is_residual

# 64 as in flash-linear-attention and the Triton kernels (C = 32 measured ~15% faster for the delta
# modes on a 2-core CPU; see docs/benchmarks.md). chunk_size is a parameter for such tuning.
CHUNK_SIZE = 64
_BLOCK = 16  # diagonal blocks inverted by LAPACK in _unit_lower_inverse; larger ones are assembled


def _to_chunks(x: torch.Tensor, n_chunks: int, chunk: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, *D] -> [N, B * H, C, *D] in ``dtype``, zero-padded at the end of T.

    Chunks lead so that the per-chunk slices of the sequential loop are contiguous.
    """
    pad = n_chunks * chunk - x.shape[1]
    if pad:
        # zeros mean k = v = beta = gamma = 0 and g = 0 (alpha = 1): padded tokens leave states as they are
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    x = x.to(dtype).reshape(x.shape[0], n_chunks, chunk, *x.shape[2:])
    order = (1, 0, 3, 2, *range(4, x.dim()))
    return x.permute(order).contiguous().flatten(1, 2)


def _unit_lower_inverse(strict_lower: torch.Tensor) -> torch.Tensor:
    """(I + strict_lower)^-1 for batches of [C, C] matrices.

    Diagonal blocks of size _BLOCK are inverted by one batched triangular solve, then pairs of
    neighbouring blocks merge as [[T1, 0], [-T2 A21 T1, T2]] until one block is left (faster on
    CPU than one LAPACK solve of the whole matrix). C not a power-of-two multiple of _BLOCK:
    one solve.
    """
    C = strict_lower.shape[-1]
    m = _BLOCK if C % _BLOCK == 0 and (C // _BLOCK) & (C // _BLOCK - 1) == 0 else C
    blocks = strict_lower.unflatten(-2, (C // m, m)).unflatten(-1, (C // m, m))  # [..., nb, m, nb, m]
    diag = blocks.diagonal(dim1=-4, dim2=-2).movedim(-1, -3)  # [..., nb, m, m]
    eye = torch.eye(m, dtype=diag.dtype, device=diag.device)
    inv = torch.linalg.solve_triangular(diag, eye.expand_as(diag), upper=False, unitriangular=True)
    while m < C:
        n_pairs = C // (2 * m)
        pairs = strict_lower.unflatten(-2, (n_pairs, 2 * m)).unflatten(-1, (n_pairs, 2 * m))
        a21 = pairs.diagonal(dim1=-4, dim2=-2).movedim(-1, -3)[..., m:, :m]  # [..., n_pairs, m, m]
        t11, t22 = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        t21 = -(t22 @ a21 @ t11)
        inv = torch.cat([torch.cat([t11, torch.zeros_like(t11)], -1), torch.cat([t21, t22], -1)], -2)
        m *= 2
    return inv.squeeze(-3)


def _pass(
    values: torch.Tensor,
    strength: torch.Tensor,
    state: torch.Tensor,
    chunks: dict[str, torch.Tensor],
    delta: bool,
    qk: torch.Tensor,
    need_error: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One gated linear attention (delta rule if ``delta``) over all chunks.

    values [N, BH, C, V], strength [N, BH, C], state [BH, K, V]; ``qk`` is the decayed Q K^T the
    output reads (inclusive, or strictly causal for the base pass of residual modes).
    Returns the output [N, BH, C, V], the error e (if delta or ``need_error``) and the final state.
    """
    s = strength[..., None]
    k_gamma, kk = chunks["k_gamma"], chunks.get("kk")
    if delta:
        t = _unit_lower_inverse(kk * strength[..., None, :])
        u, w = t @ values, t @ k_gamma
    elif need_error:
        u, w = values - kk @ (s * values), k_gamma
    # the state advances by exp(b_C) S + K_w^T (e or v), K_w = K * exp(b_C - b) * strength
    k_write = (chunks["k"] * (chunks["to_end"] * strength)[..., None]).transpose(-1, -2)
    decays = chunks["chunk_decay"].unbind(0)
    states, errors = [], []
    if delta:
        for u_n, w_n, k_n, decay in zip(u.unbind(0), w.unbind(0), k_write.unbind(0), decays):
            states.append(state)
            errors.append(torch.baddbmm(u_n, w_n, state, alpha=-1))
            state = torch.baddbmm(decay * state, k_n, errors[-1])
    else:  # what each chunk writes does not depend on the state: one batched product, then a scan
        for increment, decay in zip((k_write @ values).unbind(0), decays):
            states.append(state)
            state = torch.addcmul(increment, decay, state)
    states = torch.stack(states)  # entering state of every chunk, [N, BH, K, V]
    if delta:
        e = torch.stack(errors)
        x = s * e
    else:
        e = u - w @ states if need_error else None
        x = s * values
    o = torch.baddbmm((qk @ x).flatten(0, 1), chunks["q_gamma"].flatten(0, 1), states.flatten(0, 1))
    return o.view_as(x), e, state


def chunked_residual_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor | None,
    mode: str,
    clip: float,
    scale: float,
    initial_state: tuple[torch.Tensor | None, torch.Tensor | None],
    output_final_state: bool,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None] | None]:
    """Chunked path, same arguments and results as ``recurrent_residual_attention``.

    q, k: [B, T, H, K]; v: [B, T, H, V]; g, beta, gamma: [B, T, H]; T is any length.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype, dt = q.dtype, state_dtype(q.dtype)
    delta, residual = is_delta(mode), is_residual(mode)
    C = chunk_size
    N = max(1, -(-T // C))

    q_c = _to_chunks(q, N, C, dt) * scale
    k_c, v_c = _to_chunks(k, N, C, dt), _to_chunks(v, N, C, dt)
    g_c, beta_c = _to_chunks(g, N, C, dt), _to_chunks(beta, N, C, dt)

    # Decays. g = -inf (alpha = 0) is an exact reset: it adds 0 to the cumulative sum b and 1 to
    # the reset count n instead (cumsum over -inf would give -inf - -inf = NaN), and every decay
    # that spans a reset (n differs at its ends) is masked to exactly 0. On finite g this is the
    # plain cumulative sum, bit for bit. Masks go on the exponent (-inf), never after exp: a
    # zero gradient through exp(+large) would be 0 * inf = NaN. Every exponent is <= 0.
    reset = torch.isneginf(g_c)
    b = g_c.masked_fill(reset, 0).cumsum(-1)  # [N, BH, C]
    n = reset.cumsum(-1)  # resets in the chunk up to and including t
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    no_reset = causal & (n[..., :, None] == n[..., None, :])  # s <= t, no reset in (s, t]
    decay = (b[..., :, None] - b[..., None, :]).masked_fill(~no_reset, float("-inf")).exp()
    before_reset = n > 0  # the chunk's entering state is gone by t
    after_reset = n[..., -1:] > n  # what t writes is gone by the chunk's end
    growth = b.masked_fill(before_reset, float("-inf")).exp()[..., None]  # exp(b_t)
    chunks = {
        "chunk_decay": growth[..., -1:, :],  # exp(b_C), [N, BH, 1, 1]
        "q_gamma": q_c * growth,  # Gamma Q
        "k_gamma": k_c * growth,  # Gamma K
        "k": k_c,
        "to_end": (b[..., -1:] - b).masked_fill(after_reset, float("-inf")).exp(),  # exp(b_C - b_t)
    }
    qk = (q_c @ k_c.transpose(-1, -2)) * decay  # inclusive: reads S_t
    if delta or residual:
        chunks["kk"] = ((k_c @ k_c.transpose(-1, -2)) * decay).tril(-1)  # strictly causal: reads S~_t

    S0, R0 = initial_state
    S = S0.to(dt).flatten(0, 1) if S0 is not None else q_c.new_zeros(B * H, K, V)
    # residual modes read the base state before the token writes (S~_t), so strictly causal
    o, e, S = _pass(v_c, beta_c, S, chunks, delta, qk.tril(-1) if residual else qk, residual)
    R = None
    if residual:
        gamma_c = _to_chunks(gamma, N, C, dt)
        R = R0.to(dt).flatten(0, 1) if R0 is not None else q_c.new_zeros(B * H, K, V)
        o_res, _, R = _pass(e.clamp(-clip, clip), gamma_c, R, chunks, delta, qk, False)
        o = o + gamma_c[..., None] * o_res
        R = R.view(B, H, K, V)

    o = o.view(N, B, H, C, V).permute(1, 0, 3, 2, 4).reshape(B, N * C, H, V)[:, :T].to(out_dtype)
    return o, ((S.view(B, H, K, V), R) if output_final_state else None)
