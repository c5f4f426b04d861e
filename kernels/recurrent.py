"""Token-by-token reference of residual linear attention: the ground truth for every path.

It follows the recurrence of the spec literally, one token at a time, with states in fp32
(fp64 for fp64 inputs). Slow by design; used by tests, by the benchmarks as the baseline,
and for short decode steps where a chunk would be mostly padding.
"""

from __future__ import annotations

import torch

from .common import state_dtype
from .modes import is_delta, is_residual


def recurrent_residual_attention(
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
    step_states: list | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None] | None]:
    """Reference recurrence. Arguments are already validated by ``residual_attention``.

    q, k: [B, T, H, K]; v: [B, T, H, V]; g, beta, gamma: [B, T, H];
    initial_state: (S0, R0), each [B, H, K, V] or None.
    Returns o [B, T, H, V] in q's dtype and, if asked, (S, R) in the state dtype.
    step_states: if a list, (S, R) after every token is appended to it (cache rollback logs).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype, dt = q.dtype, state_dtype(q.dtype)
    delta, residual = is_delta(mode), is_residual(mode)
    S0, R0 = initial_state
    S = S0.to(dt).clone() if S0 is not None else q.new_zeros(B, H, K, V, dtype=dt)
    R = None
    if residual:
        R = R0.to(dt).clone() if R0 is not None else q.new_zeros(B, H, K, V, dtype=dt)

    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    gamma = gamma.to(dt) if gamma is not None else None
    o = torch.empty(B, T, H, V, dtype=dt, device=q.device)
    for t in range(T):
        q_t, k_t, v_t = q[:, t] * scale, k[:, t], v[:, t]
        alpha = g[:, t].exp()[..., None, None]
        S_tilde = alpha * S
        e = v_t - torch.einsum("bhk,bhkv->bhv", k_t, S_tilde)
        written = e if delta else v_t
        S = S_tilde + beta[:, t, :, None, None] * k_t[..., None] * written[..., None, :]
        if not residual:
            o[:, t] = torch.einsum("bhk,bhkv->bhv", q_t, S)
            if step_states is not None:
                step_states.append((S, None))
            continue
        c_t = gamma[:, t, :, None]
        R_tilde = alpha * R
        r = e.clamp(-clip, clip)
        if delta:
            r = r - torch.einsum("bhk,bhkv->bhv", k_t, R_tilde)
        R = R_tilde + c_t[..., None] * k_t[..., None] * r[..., None, :]
        base = torch.einsum("bhk,bhkv->bhv", q_t, S_tilde)
        o[:, t] = base + c_t * torch.einsum("bhk,bhkv->bhv", q_t, R)
        if step_states is not None:
            step_states.append((S, R))
    final = (S, R) if output_final_state else None
    return o.to(out_dtype), final
