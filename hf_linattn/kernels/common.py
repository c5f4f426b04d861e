"""Facts shared by every backend of the op family (plain torch; also checkpoint remote code)."""

from __future__ import annotations

import torch


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """States are fp32, or fp64 when the inputs are fp64 (so tests can compare at fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
