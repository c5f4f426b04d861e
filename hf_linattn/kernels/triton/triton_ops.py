"""What the Triton kernels cover, and the chunked entry point: the one module ``ops.py`` imports from here.

Two capabilities, each listed by mode:
    BLOCK_MODES     : block decode (``triton_block.py``): n >= 1 new tokens from a cached state, with the
                      per-position record; used by the model layers' decode and verify steps on CUDA.
    SUPPORTED_MODES : the chunked forward/backward (``triton_chunk.py``), i.e. ``residual_attention(...,
                      backend="triton")`` and backend="auto" on CUDA tensors. () while that module is absent
                      from this build or checkpoint (``CHUNK_UNAVAILABLE`` then says why).
Importing this module raises ImportError when triton does not import (``triton_block`` needs it); ``ops.py``
catches that and keeps the torch paths. The chunk kernel's import is guarded separately so that block decode
works without it. Relative imports only after flattening (also checkpoint remote code).
"""

from __future__ import annotations

import torch

from hf_linattn.kernels.modes import MODES
from hf_linattn.kernels.triton.triton_block import block_residual_attention_triton, decode_step_triton

try:  # a separate file that may not be part of this build or checkpoint (export.py drops a missing one)
    from .triton_chunk import chunk_residual_attention_triton
except ImportError as err:
    chunk_residual_attention_triton = None
    CHUNK_UNAVAILABLE = f"the chunked Triton kernel does not import ({type(err).__name__}: {err})"
else:
    CHUNK_UNAVAILABLE = ""

BLOCK_MODES: tuple[str, ...] = MODES
SUPPORTED_MODES: tuple[str, ...] = MODES if chunk_residual_attention_triton is not None else ()


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
    """Same contract as ``chunked_residual_attention``: the chunked Triton kernel (``triton_chunk.py``)."""
    if chunk_residual_attention_triton is None:
        raise NotImplementedError(f"backend='triton': {CHUNK_UNAVAILABLE}; use backend='torch' or 'auto'")
    return chunk_residual_attention_triton(q, k, v, g, beta, gamma, mode, clip, scale, initial_state,
                                           output_final_state)  # fmt: skip


__all__ = [
    "BLOCK_MODES",
    "CHUNK_UNAVAILABLE",
    "SUPPORTED_MODES",
    "block_residual_attention_triton",
    "decode_step_triton",
    "triton_residual_attention",
]
