"""Token-by-token reference of residual linear attention: the ground truth for every path.

It follows the recurrence of the spec literally, one token at a time (``decode.py`` holds the
step), with states in fp32
(fp64 for fp64 inputs). Slow by design; used by tests, by the benchmarks as the baseline,
and for short decode steps where a chunk would be mostly padding.
g = -inf is an exact reset: alpha = exp(g) = 0 multiplies only finite states (0, not NaN), and
its gradient exp(g) = 0 gives g a zero gradient there.
"""

from __future__ import annotations

import torch

from .common import state_dtype
from .decode import decode_step
from .modes import is_residual


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
    B, T, H, _ = q.shape
    V = v.shape[-1]
    dt = state_dtype(q.dtype)
    state = initial_state if initial_state is not None else (None, None)
    o = torch.empty(B, T, H, V, dtype=dt, device=q.device)
    for t in range(T):
        o[:, t], state = decode_step(
            q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], None if gamma is None else gamma[:, t],
            mode=mode, clip=clip, scale=scale, state=state, out_dtype=dt,
        )  # fmt: skip
        if step_states is not None:
            step_states.append(state)
    if state[0] is None:  # T = 0: the initial state (zeros if none), in the state dtype
        S = torch.zeros(B, H, q.shape[-1], V, dtype=dt, device=q.device)
        state = (S, torch.zeros_like(S) if is_residual(mode) else None)
    final = (state[0].to(dt), None if state[1] is None else state[1].to(dt)) if output_final_state else None
    return o.to(q.dtype), final
