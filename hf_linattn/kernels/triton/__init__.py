"""Triton GPU kernels (chunked forward/backward, fused recurrent decode).

Not written yet: the kernels issue brings them. Until then the backend refuses clearly.
``SUPPORTED_MODES`` lists the modes with kernels here: backend="auto" picks Triton (on CUDA
tensors) only for those, and an explicit backend="triton" for another mode is refused in
``ops.resolve_backend``.
"""

from __future__ import annotations

import torch

SUPPORTED_MODES: tuple[str, ...] = ()  # no kernels written yet


def triton_residual_attention(
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
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None] | None]:
    """Same contract as ``recurrent_residual_attention``; not implemented yet."""
    raise NotImplementedError(
        "backend='triton' is not implemented yet (the Triton kernels issue); use backend='torch' or 'auto'"
    )
