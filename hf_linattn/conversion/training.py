"""What the conversion stages share: one checked optimizer step and one resumable step loop.

Both run single-process or under accelerate (DDP): a process computes the loss on its own rows
of the global batch, gradients are averaged by ``accelerator.backward``, and the loss that is
checked and recorded is the mean over processes, so every process stops on the same step.
"""

from __future__ import annotations

import math
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


LR_SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, steps: int, schedule: str) -> float:
    """The learning-rate multiplier of ``step`` (0-based) of ``steps``.

    "cosine": linear warmup over the first 5% of the steps, then cosine decay to 10% of the peak at the
    last step; a pure function of the step, so a resumed run continues the schedule exactly.
    """
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; expected one of {LR_SCHEDULES}")
    warmup = max(1, round(0.05 * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))


def run_steps(
    loss_for_step: Callable[[int], torch.Tensor],
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    steps: int,
    stage: str,
    checkpoint: StageCheckpoint | None = None,
    accelerator: Accelerator | None = None,
    progress: bool = True,
    schedule: str = "constant",
) -> list[float]:
    """Steps ``start..steps-1`` (``start`` from ``checkpoint`` if one was saved); returns all losses so far.

    The optimizer's learning rates are the peaks of ``schedule`` (see ``lr_factor``).
    """
    peaks = [group["lr"] for group in optimizer.param_groups]  # before a restore overwrites them
    start, history = checkpoint.restore(params, optimizer) if checkpoint else (0, [])
    main = accelerator is None or accelerator.is_main_process
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=stage, disable=not (progress and main))
    for step in bar:
        for group, peak in zip(optimizer.param_groups, peaks, strict=True):
            group["lr"] = peak * lr_factor(step, steps, schedule)
        history.append(checked_step(optimizer, loss_for_step(step), stage, step, accelerator))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
        if checkpoint and ((step + 1) % checkpoint.every == 0 or step + 1 == steps):
            if main:
                checkpoint.save(step + 1, params, optimizer, history)
            if accelerator is not None:
                accelerator.wait_for_everyone()
    return history
