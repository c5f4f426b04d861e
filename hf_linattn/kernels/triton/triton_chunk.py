"""Chunked residual linear attention on Triton: ``chunk_residual_attention_triton``, differentiable.

Forward: the fused Triton kernel of ``triton_chunk_fwd.py`` (both passes of rla/rdn per chunk in
one launch; the base error e feeds the residual pass from registers, never through HBM).

Backward (INTERMEDIATE STEP): not in Triton yet. ``backward`` recomputes the forward with the pure
PyTorch chunked path (``chunked_residual_attention``, fp32 states) under autograd and returns its
gradients for q, k, v, g, beta, gamma and the initial states (S0, R0). Gradients are exact to
fp32 rounding (the clip passes the gradient where |e| <= clip, zero elsewhere; g = -inf gets a
zero gradient), but the backward costs a torch chunked forward plus its autograd, and packed
(varlen) sequences are recomputed as a zero-padded batch. Triton backward kernels replace it
later behind the same entry point.
"""

from __future__ import annotations

import torch

from hf_linattn.kernels.chunked import chunked_residual_attention
from hf_linattn.kernels.modes import is_delta, is_residual

from .triton_chunk_fwd import chunk_forward

_NAMES = ("q", "k", "v", "g", "beta", "gamma", "S0", "R0")


def _padded_batch(x: torch.Tensor, index: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Packed [1, total, ...] -> [N, T_max, ...] gathered at ``index`` [N, T_max], zero where not ``keep``."""
    out = x[0][index]
    mask = keep.view(*keep.shape, *([1] * (out.dim() - 2)))
    return torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=out.device))  # zeros leave states alone


def _torch_recompute(tensors, mode, clip, scale, cu_seqlens, chunk_size):
    """The torch chunked path on the same arguments (varlen as a zero-padded batch); o, S, R."""
    q, k, v, g, beta, gamma, S0, R0 = tensors
    if cu_seqlens is None:
        o, (S, R) = chunked_residual_attention(
            q, k, v, g, beta, gamma, mode, clip, scale, (S0, R0), True, chunk_size=chunk_size
        )
        return o, S, R
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    t_max = int(lengths.max()) if lengths.numel() else 0  # host sync: acceptable in this fallback
    starts = cu_seqlens[:-1].to(torch.long)[:, None]
    pos = torch.arange(t_max, device=q.device)[None, :]
    keep = pos < lengths.to(torch.long)[:, None]
    index = (starts + pos).clamp(max=max(q.shape[1] - 1, 0))
    padded = [None if x is None else _padded_batch(x, index, keep) for x in (q, k, v, g, beta, gamma)]
    o, (S, R) = chunked_residual_attention(*padded, mode, clip, scale, (S0, R0), True, chunk_size=chunk_size)
    return o[keep].unsqueeze(0), S, R  # boolean indexing keeps sequence-major order: the packed layout


class _ChunkResidualAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, gamma, S0, R0, mode, clip, scale, cu_seqlens, chunk_size):
        o, S, R = chunk_forward(
            q, k, v, g, beta, gamma, S0, R0, delta=is_delta(mode), residual=is_residual(mode), clip=clip,
            scale=scale, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, g, beta, gamma, S0, R0, cu_seqlens)
        ctx.config = (mode, clip, scale, chunk_size)
        return o, S, R

    @staticmethod
    def backward(ctx, do, dS, dR):
        *tensors, cu_seqlens = ctx.saved_tensors
        mode, clip, scale, chunk_size = ctx.config
        needs = ctx.needs_input_grad[: len(_NAMES)]
        with torch.enable_grad():
            leaves = [None if x is None else x.detach().requires_grad_(need) for x, need in zip(tensors, needs)]
            o, S, R = _torch_recompute(leaves, mode, clip, scale, cu_seqlens, chunk_size)
            outputs, grads = [o], [do]
            for out, grad in ((S, dS), (R, dR)):
                if out is not None and grad is not None:
                    outputs.append(out)
                    grads.append(grad)
            wanted = [x for x, need in zip(leaves, needs) if x is not None and need]
            found = iter(torch.autograd.grad(outputs, wanted, grads, allow_unused=True)) if wanted else iter(())
        result = [next(found) if x is not None and need else None for x, need in zip(leaves, needs)]
        return (*result, None, None, None, None, None)


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
    cu_seqlens: int32/int64 [N + 1] offsets of packed sequences (B must be 1), each starting from
    its own initial state. chunk_size: 16, 32 or 64. K <= 256.
    Returns o [B, T, H, V] in q's dtype and, if ``output_final_state``, (S, R) each [N, H, K, V]
    in fp32 (R None for gla/gdn), else None. Any float input dtype is computed in fp32.
    """
    residual = is_residual(mode)
    S0, R0 = initial_state if initial_state is not None else (None, None)
    if not residual:
        gamma = R0 = None
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs packed sequences in a batch of 1; got batch {q.shape[0]}")
    tensors = [None if x is None else x.contiguous() for x in (q, k, v, g, beta, gamma, S0, R0)]
    o, S, R = _ChunkResidualAttention.apply(*tensors, mode, clip, scale, cu_seqlens, chunk_size)
    return o, ((S, R) if output_final_state else None)
