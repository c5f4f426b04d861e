"""Ops of the residual linear-attention family (``hf_linattn.kernels``).

Per op, side by side as in flash-linear-attention: ``recurrent.py`` (token-by-token reference,
the ground truth), ``chunked.py`` (chunkwise-parallel pure PyTorch, the CPU path) and
``triton/`` (GPU kernels). ``residual_attention`` in ``ops.py`` validates and dispatches.
``modes.py`` (the mode list) is plain Python; the names load lazily so that importing it does
not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hf_linattn._lazy import lazy_attributes

# public name -> module of this package that defines it
_LAZY = {
    "CHUNK_SIZE": "chunked",
    "chunked_residual_attention": "chunked",
    "MODES": "modes",
    "is_delta": "modes",
    "is_residual": "modes",
    "BACKENDS": "ops",
    "BLOCK_BACKENDS": "ops",
    "dispatch_block_residual_attention": "ops",
    "dispatch_decode_step": "ops",
    "resolve_block_backend": "ops",
    "dispatch_residual_attention": "ops",
    "residual_attention": "ops",
    "resolve_backend": "ops",
    "recurrent_residual_attention": "recurrent",
}

if TYPE_CHECKING:
    from .chunked import CHUNK_SIZE, chunked_residual_attention
    from .modes import MODES, is_delta, is_residual
    from .ops import (
        BACKENDS,
        BLOCK_BACKENDS,
        dispatch_block_residual_attention,
        dispatch_decode_step,
        dispatch_residual_attention,
        residual_attention,
        resolve_backend,
        resolve_block_backend,
    )
    from .recurrent import recurrent_residual_attention


__getattr__, __dir__ = lazy_attributes(__name__, {name: f".{module}" for name, module in _LAZY.items()})

__all__ = [
    "BACKENDS",
    "BLOCK_BACKENDS",
    "CHUNK_SIZE",
    "MODES",
    "chunked_residual_attention",
    "dispatch_block_residual_attention",
    "dispatch_decode_step",
    "dispatch_residual_attention",
    "is_delta",
    "is_residual",
    "recurrent_residual_attention",
    "residual_attention",
    "resolve_backend",
    "resolve_block_backend",
]
