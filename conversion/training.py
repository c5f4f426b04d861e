"""What the conversion stages share: one checked optimizer step."""

from __future__ import annotations

import torch


class NonFiniteLossError(RuntimeError):
    """A training loss was NaN or inf; the parameters still hold the last good step."""


def checked_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, stage: str, step: int) -> float:
    """Backward and step on ``loss``; refuse a non-finite loss before anything is updated. Returns the loss."""
    value = loss.item()
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"{stage} step {step}: loss is {value}; parameters kept from the step before")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return value
