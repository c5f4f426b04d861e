"""One decoding step of residual linear attention: the spec's recurrence for a single token, as fused tensor ops.

No Python loop and no data-dependent control flow, so it runs under torch.compile (and CUDA graphs)
with fixed shapes. Plain torch, relative imports only (also checkpoint remote code).
"""

from __future__ import annotations

import torch

from .common import state_dtype
from .modes import is_delta, is_residual


def decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor | None,
    *,
    mode: str,
    clip: float,
    scale: float,
    state: tuple[torch.Tensor | None, torch.Tensor | None],
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]]:
    """One token: q, k [B, H, K]; v [B, H, V]; g, beta, gamma [B, H]; state (S, R), each [B, H, K, V] or None.

    Returns o [B, H, V] in ``out_dtype`` (default q's dtype) and the new (S, R) in the state dtype
    (R None for gla/gdn). The states passed in are never modified.
    """
    out_dtype = out_dtype or q.dtype
    dt = state_dtype(q.dtype)
    B, H, K = q.shape
    V = v.shape[-1]

    def cast(x: torch.Tensor) -> torch.Tensor:  # skips no-op casts: a decode step is dispatch-bound
        return x if x.dtype == dt else x.to(dt)

    S, R = state
    S = cast(S) if S is not None else q.new_zeros(B, H, K, V, dtype=dt)
    q_t, k_t, v_t = (cast(q) * scale)[..., None, :], cast(k)[..., None, :], cast(v)  # rows: [B, H, 1, K]
    alpha = cast(g).exp()[..., None, None]
    S_tilde = alpha * S
    e = v_t - (k_t @ S_tilde).squeeze(-2)
    written = e if is_delta(mode) else v_t
    S_new = S_tilde + (cast(beta)[..., None, None] * k_t.transpose(-1, -2)) * written[..., None, :]
    if not is_residual(mode):
        o = (q_t @ S_new).squeeze(-2)
        return (o if o.dtype == out_dtype else o.to(out_dtype)), (S_new, None)
    R = cast(R) if R is not None else torch.zeros_like(S)
    c = cast(gamma)[..., None]
    R_tilde = alpha * R
    r = e.clamp(-clip, clip)
    if is_delta(mode):
        r = r - (k_t @ R_tilde).squeeze(-2)
    R_new = R_tilde + (c[..., None] * k_t.transpose(-1, -2)) * r[..., None, :]
    o = (q_t @ S_tilde).squeeze(-2) + c * (q_t @ R_new).squeeze(-2)
    return (o if o.dtype == out_dtype else o.to(out_dtype)), (S_new, R_new)


__all__ = ["decode_step"]
