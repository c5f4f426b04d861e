"""Ops of the residual linear-attention family (``hf_linattn.kernels``).

Per op, side by side as in flash-linear-attention: ``recurrent.py`` (token-by-token reference,
the ground truth), ``chunked.py`` (chunkwise-parallel pure PyTorch, the CPU path) and
``triton/`` (GPU kernels). ``residual_attention`` in ``ops.py`` validates and dispatches.
"""

from .chunked import CHUNK_SIZE, chunked_residual_attention
from .modes import MODES, is_delta, is_residual
from .ops import BACKENDS, residual_attention
from .recurrent import recurrent_residual_attention

__all__ = [
    "BACKENDS",
    "CHUNK_SIZE",
    "MODES",
    "chunked_residual_attention",
    "is_delta",
    "is_residual",
    "recurrent_residual_attention",
    "residual_attention",
]
