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
W = Gamma K. Residual modes run a second recurrence of the same shape on the clipped error r
with write strength gamma, inside the same chunk loop, so both states advance together.

Everything that does not depend on the entering state (decays, Q K^T, K K^T, the triangular
solves) is computed for all chunks in one batched call; only the small state products run in
the Python loop over chunks. Every exponent is <= 0, so nothing overflows. Differentiable by
autograd. This file imports nothing from hf_linattn (it is also checkpoint remote code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .modes import is_delta, is_residual, state_dtype

CHUNK_SIZE = 64


def _to_chunks(x: torch.Tensor, n_chunks: int, chunk: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, *D] -> [N, B, H, C, *D] in ``dtype``, zero-padded at the end of T.

    Chunks lead so that the per-chunk slices of the sequential loop are contiguous.
    """
    pad = n_chunks * chunk - x.shape[1]
    if pad:
        # zeros mean k = v = beta = gamma = 0 and g = 0 (alpha = 1): padded tokens leave states as they are
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    x = x.to(dtype).reshape(x.shape[0], n_chunks, chunk, *x.shape[2:])
    order = (1, 0, 3, 2, *range(4, x.dim()))
    return x.permute(order).contiguous()


def _unit_lower_inverse(strict_lower: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """(I + strict_lower * strength[..., None, :])^-1 for batches of [C, C] matrices."""
    eye = torch.eye(strict_lower.shape[-1], dtype=strict_lower.dtype, device=strict_lower.device)
    system = eye + strict_lower * strength[..., None, :]
    return torch.linalg.solve_triangular(system, eye.expand_as(system), upper=False, unitriangular=True)


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
    gamma_c = _to_chunks(gamma, N, C, dt) if residual else None

    # decays; every exponent is <= 0
    b = g_c.cumsum(-1)  # [N, B, H, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    to_end = (b[..., -1:] - b).exp()  # exp(b_C - b_t)
    chunk_decay = b[..., -1].exp()[..., None, None]  # [N, B, H, 1, 1]
    q_gamma = q_c * b.exp()[..., None]  # Gamma Q
    k_gamma = k_c * b.exp()[..., None]  # Gamma K
    k_end = k_c * to_end[..., None]

    qk = (q_c @ k_c.transpose(-1, -2)) * decay  # inclusive: reads S_t
    kk = ((k_c @ k_c.transpose(-1, -2)) * decay).tril(-1)  # strictly causal: reads S~_t
    # residual modes read the base state before the token writes (S~_t), so strictly causal
    qk_base = qk.tril(-1) if residual else qk

    if delta:
        t_base = _unit_lower_inverse(kk, beta_c)
        u_base, w_base = t_base @ v_c, t_base @ k_gamma
    else:
        u_base, w_base = v_c - kk @ (beta_c[..., None] * v_c), k_gamma
    if residual and delta:
        t_res = _unit_lower_inverse(kk, gamma_c)
        w_res = t_res @ k_gamma

    S0, R0 = initial_state
    S = S0.to(dt) if S0 is not None else q_c.new_zeros(B, H, K, V)
    R = None
    if residual:
        R = R0.to(dt) if R0 is not None else q_c.new_zeros(B, H, K, V)

    o = torch.empty(N, B, H, C, V, dtype=dt, device=q.device)
    for n in range(N):
        e = u_base[n] - w_base[n] @ S
        x = beta_c[n, ..., None] * (e if delta else v_c[n])
        o_n = q_gamma[n] @ S + qk_base[n] @ x
        S = chunk_decay[n] * S + k_end[n].transpose(-1, -2) @ x
        if residual:
            c_n = gamma_c[n, ..., None]
            r = e.clamp(-clip, clip)
            if delta:
                r = t_res[n] @ r - w_res[n] @ R  # the error of the second delta rule
            x_res = c_n * r
            o_n = o_n + c_n * (q_gamma[n] @ R + qk[n] @ x_res)
            R = chunk_decay[n] * R + k_end[n].transpose(-1, -2) @ x_res
        o[n] = o_n

    o = o.permute(1, 0, 3, 2, 4).reshape(B, N * C, H, V)[:, :T].to(out_dtype)
    return o, ((S, R) if output_final_state else None)
