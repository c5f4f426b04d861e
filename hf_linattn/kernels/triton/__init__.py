"""Triton GPU kernels of the op family, one file per kernel (names unique package-wide: checkpoints flatten them).

    triton_block.py : block decode, n >= 1 tokens from a cached state with the per-position record (and the
                      fused single-token step)
    triton_chunk.py : chunked forward/backward (training, prefill); may be absent from a build
    triton_ops.py   : what is covered (BLOCK_MODES, SUPPORTED_MODES) and ``triton_residual_attention``

``ops.py`` imports ``triton_ops`` by an explicit (guarded) statement, so that saved checkpoints carry these
files as remote code. This package module re-exports it when it imports, and lists no modes otherwise
(``CHUNK_UNAVAILABLE`` then says why): importing it never fails.
"""

from __future__ import annotations

try:
    from .triton_ops import (
        BLOCK_MODES,
        CHUNK_UNAVAILABLE,
        SUPPORTED_MODES,
        block_residual_attention_triton,
        decode_step_triton,
        triton_residual_attention,
    )
except Exception as err:  # triton is not installed, or broken (which can raise anything): no kernels
    BLOCK_MODES = SUPPORTED_MODES = ()
    CHUNK_UNAVAILABLE = f"the Triton kernels do not import ({type(err).__name__}: {err})"

__all__ = [
    "BLOCK_MODES",
    "CHUNK_UNAVAILABLE",
    "SUPPORTED_MODES",
    "block_residual_attention_triton",
    "decode_step_triton",
    "triton_residual_attention",
]
