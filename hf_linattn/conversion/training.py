"""What the conversion stages share: one checked optimizer step and one resumable step loop.

Both run single-process or under accelerate (DDP): a process computes the loss on its own rows
of the global batch, gradients are averaged by ``accelerator.backward``, and the loss that is
checked and recorded is the mean over processes, so every process stops on the same step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from hf_linattn.errors import UserError

from .checkpoint import StageCheckpoint


class NonFiniteLossError(UserError, RuntimeError):
    """A training loss was NaN or inf; the parameters still hold the last good step."""


def checked_step(
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    stage: str,
    step: int,
    accelerator: Accelerator | None = None,
) -> float:
    """Backward and step on ``loss``; refuse a non-finite loss before anything is updated. Returns the loss."""
    value = loss.detach().float()
    if accelerator is not None and accelerator.num_processes > 1:
        value = accelerator.reduce(value.clone(), reduction="mean")
    if not torch.isfinite(value):
        raise NonFiniteLossError(
            f"{stage} step {step}: loss is {value.item()}; parameters kept from the step before "
            "(a lower learning rate may help)"
        )
    optimizer.zero_grad(set_to_none=True)
    if accelerator is not None:
        accelerator.backward(loss)
    else:
        loss.backward()
    optimizer.step()
    return value.item()


def run_steps(
    loss_for_step: Callable[[int], torch.Tensor],
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    steps: int,
    stage: str,
    checkpoint: StageCheckpoint | None = None,
    accelerator: Accelerator | None = None,
    progress: bool = True,
) -> list[float]:
    """Steps ``start..steps-1`` (``start`` from ``checkpoint`` if one was saved); returns all losses so far."""
    start, history = checkpoint.restore(params, optimizer) if checkpoint else (0, [])
    main = accelerator is None or accelerator.is_main_process
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=stage, disable=not (progress and main))
    for step in bar:
        history.append(checked_step(optimizer, loss_for_step(step), stage, step, accelerator))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
        if checkpoint and ((step + 1) % checkpoint.every == 0 or step + 1 == steps):
            if main:
                checkpoint.save(step + 1, params, optimizer, history)
            if accelerator is not None:
                accelerator.wait_for_everyone()
    return history
