"""The four modes of the residual linear-attention family and their two switches.

Every backend reads these tables instead of comparing mode strings, so a new mode is one
line here. The file is plain torch and imports nothing from hf_linattn: it is also copied
into checkpoints as remote code (see hf_linattn/modeling/__init__.py).
"""

from __future__ import annotations

import torch

# mode -> (delta rule writes the error e instead of v, residual state R exists)
MODE_TABLE: dict[str, tuple[bool, bool]] = {
    "gla": (False, False),
    "gdn": (True, False),
    "rla": (False, True),
    "rdn": (True, True),
}
MODES: tuple[str, ...] = tuple(MODE_TABLE)


def is_delta(mode: str) -> bool:
    """True when the base state is updated by the delta rule (gdn, rdn)."""
    return MODE_TABLE[mode][0]


def is_residual(mode: str) -> bool:
    """True when the mode keeps the clipped residual state R (rla, rdn)."""
    return MODE_TABLE[mode][1]


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """States are fp32, or fp64 when the inputs are fp64 (so tests can compare at fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
