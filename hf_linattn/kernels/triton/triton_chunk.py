"""Chunked residual linear attention on Triton: ``chunk_residual_attention_triton``, differentiable.

Forward (``triton_chunk_fwd.py``): a parallel kernel builds every chunk's unit-lower inverses (delta
modes), then one sequential kernel per (sequence x head, V-tile) runs both passes of rla/rdn chunk by
chunk (the base error e feeds the residual pass from registers, never through HBM). With grad mode on
and an input that needs a gradient, it also stores every chunk's entering states (S, R), fp32.
Backward (``triton_chunk_bwd.py``): one sequential kernel walks the chunks in reverse, recomputing each
from those states, and returns the gradients of q, k, v, g, beta, gamma, S0 and R0 (the clip passes
the gradient where |e| <= clip, as torch.clamp; g = -inf gets a zero gradient). Once differentiable.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from hf_linattn.kernels.modes import is_delta, is_residual

from .triton_chunk_bwd import chunk_backward
from .triton_chunk_fwd import chunk_forward


class _ChunkResidualAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, gamma, S0, R0, mode, clip, scale, cu_seqlens, chunk_size, grad_enabled):
        kw = {"delta": is_delta(mode), "residual": is_residual(mode), "clip": clip, "scale": scale}
        kw |= {"cu_seqlens": cu_seqlens, "chunk_size": chunk_size}
        # needs_input_grad is also True under no_grad (then no backward comes): the caller's grad mode decides
        training = grad_enabled and any(ctx.needs_input_grad[:8])
        o, S, R, aux = chunk_forward(q, k, v, g, beta, gamma, S0, R0, store_states=training, **kw)
        if training:
            ctx.save_for_backward(q, k, v, g, beta, gamma, S0, R0)
            ctx.kw, ctx.aux = kw, aux  # intermediates (stored states, inverses), not inputs or outputs
        return o, S, R

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dS, dR):
        q, k, v, g, beta, gamma, S0, R0 = ctx.saved_tensors
        grads = chunk_backward(q, k, v, g, beta, gamma, ctx.aux, do, dS, dR, **ctx.kw)
        inputs = (q, k, v, g, beta, gamma, S0, R0)
        result = [
            None if x is None or not need else grad.to(x.dtype)
            for x, grad, need in zip(inputs, grads, ctx.needs_input_grad)
        ]
        return (*result, None, None, None, None, None, None)


def chunk_residual_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor | None,
    mode: str,
    clip: float,
    scale: float,
    initial_state: tuple[torch.Tensor | None, torch.Tensor | None] | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None] | None]:
    """Same contract as ``chunked_residual_attention``, on Triton kernels (differentiable).

    q, k: [B, T, H, K]; v: [B, T, H, V]; g, beta, gamma: [B, T, H] (gamma None for gla/gdn);
    initial_state: (S0, R0), each [N, H, K, V] or None (N = B, or len(cu_seqlens) - 1).
    cu_seqlens: int32/int64 [N + 1] offsets of packed sequences (B must be 1, cu_seqlens[-1] == T), each from
    its own initial state. chunk_size: 16, 32 or 64. K <= 256.
    Returns o [B, T, H, V] in q's dtype and, if ``output_final_state``, (S, R) each [N, H, K, V]
    in fp32 (R None for gla/gdn), else None. Any float input dtype is computed in fp32.
    """
    residual = is_residual(mode)
    S0, R0 = initial_state if initial_state is not None else (None, None)
    if not residual:
        gamma = R0 = None
    if cu_seqlens is not None:  # shape checks only: the values would cost a host sync
        if q.shape[0] != 1:
            raise ValueError(f"cu_seqlens needs packed sequences in a batch of 1; got batch {q.shape[0]}")
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens must be int32/int64 [N + 1], N >= 1; got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
            )
        N = cu_seqlens.numel() - 1
        for name, x in (("S0", S0), ("R0", R0)):
            if x is not None and x.shape[0] != N:
                raise ValueError(f"{name} must have one row per sequence ({N}); got {tuple(x.shape)}")
    tensors = [None if x is None else x.contiguous() for x in (q, k, v, g, beta, gamma, S0, R0)]
    grad_enabled = torch.is_grad_enabled()
    o, S, R = _ChunkResidualAttention.apply(*tensors, mode, clip, scale, cu_seqlens, chunk_size, grad_enabled)
    return o, ((S, R) if output_final_state else None)
