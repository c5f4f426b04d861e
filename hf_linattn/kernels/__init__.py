"""Ops of the residual linear-attention family (``hf_linattn.kernels``).

Per op, side by side as in flash-linear-attention: ``recurrent.py`` (token-by-token reference,
the ground truth), ``chunked.py`` (chunkwise-parallel pure PyTorch, the CPU path) and
``triton/`` (GPU kernels). ``residual_attention`` in ``ops.py`` validates and dispatches.
``modes.py`` (the mode list) is plain Python; the names load lazily so that importing it does
not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> module of this package that defines it
_LAZY = {
    "CHUNK_SIZE": "chunked",
    "chunked_residual_attention": "chunked",
    "MODES": "modes",
    "is_delta": "modes",
    "is_residual": "modes",
    "BACKENDS": "ops",
    "dispatch_residual_attention": "ops",
    "residual_attention": "ops",
    "resolve_backend": "ops",
    "recurrent_residual_attention": "recurrent",
}

if TYPE_CHECKING:
    from .chunked import CHUNK_SIZE, chunked_residual_attention
    from .modes import MODES, is_delta, is_residual
    from .ops import BACKENDS, residual_attention
    from .recurrent import recurrent_residual_attention


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "BACKENDS",
    "CHUNK_SIZE",
    "MODES",
    "chunked_residual_attention",
    "dispatch_residual_attention",
    "is_delta",
    "is_residual",
    "recurrent_residual_attention",
    "residual_attention",
    "resolve_backend",
]
