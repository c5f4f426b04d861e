"""The step loop both stages share: its learning-rate schedule, applied per step and continued on resume."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hf_linattn.cli import LR_SCHEDULES as CLI_LR_SCHEDULES
from hf_linattn.conversion.checkpoint import StageCheckpoint
from hf_linattn.conversion.training import LR_SCHEDULES, lr_factor, run_steps


def test_cli_schedules_are_the_library_schedules():
    assert tuple(CLI_LR_SCHEDULES) == tuple(LR_SCHEDULES)


def test_cosine_warms_up_then_decays_to_a_tenth():
    steps = 100
    factors = [lr_factor(s, steps, "cosine") for s in range(steps)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # 5% warmup
    assert factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))  # never rises after the warmup
    assert factors[52] == pytest.approx(0.55, abs=0.01)  # halfway through the decay
    assert [lr_factor(s, steps, "constant") for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    assert lr_factor(0, 1, "cosine") == 1.0  # a 1-step run trains at its peak
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'linear'"):
        lr_factor(0, 10, "linear")


def _sgd_run(steps: int, schedule: str, checkpoint: StageCheckpoint | None = None, stop_at: int | None = None):
    """SGD on a parameter whose gradient is always 1, so each step moves it by exactly that step's lr."""
    param = torch.nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.SGD([param], lr=0.5)

    def loss_for_step(step: int) -> torch.Tensor:
        if step == stop_at:
            raise KeyboardInterrupt
        return param * 1.0

    run_steps(loss_for_step, {"p": param}, optimizer, steps, "test", checkpoint=checkpoint, progress=False,
              schedule=schedule)  # fmt: skip
    return param.item()


@pytest.mark.parametrize("schedule", LR_SCHEDULES)
def test_every_step_uses_its_scheduled_lr_and_a_resumed_run_continues_it(schedule, tmp_path):
    steps = 20
    expected = -sum(0.5 * lr_factor(s, steps, schedule) for s in range(steps))
    assert _sgd_run(steps, schedule) == pytest.approx(expected, abs=1e-6)
    if schedule == "cosine":
        assert not math.isclose(expected, -0.5 * steps)  # the schedule changed the updates
    # interrupted at step 13 with a save every 4 steps (last save at 12), then rerun: the restored
    # optimizer holds step 11's scheduled lr, which must not become the new peak
    path = tmp_path / "state.safetensors"
    with pytest.raises(KeyboardInterrupt):
        _sgd_run(steps, schedule, StageCheckpoint(path, 4), stop_at=13)
    assert _sgd_run(steps, schedule, StageCheckpoint(path, 4)) == pytest.approx(expected, abs=1e-6)
