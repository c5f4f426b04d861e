"""The embedded teacher's training script: an interrupted run resumes exactly where it stopped."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_linattn.assets.train import train_lm
from hf_linattn.conversion.checkpoint import StageCheckpoint

STEPS = 6


def tiny_lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    return LlamaForCausalLM(config)


def run(checkpoint: StageCheckpoint | None) -> tuple[LlamaForCausalLM, list[float], list[list[float]]]:
    tokens = torch.randint(0, 64, (4000,), generator=torch.Generator().manual_seed(1))
    model = tiny_lm()
    losses, curve, seconds = train_lm(model, tokens, STEPS, 2, 32, 1e-2, 2, 0, "tiny", eval_tokens=tokens[:256],
                                      eval_every=3, checkpoint=checkpoint)  # fmt: skip
    assert seconds >= 0
    return model, losses, curve


def test_an_interrupted_run_resumes_to_the_same_weights_losses_and_curve(tmp_path, monkeypatch):
    straight, losses, curve = run(None)
    assert len(losses) == STEPS and [step for step, _ in curve] == [3, 6]

    checkpoint = StageCheckpoint(tmp_path / "tiny.safetensors", every=2)
    clip = torch.nn.utils.clip_grad_norm_
    calls = []

    def killed_at_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(checkpoint)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    assert (tmp_path / "tiny.json").is_file()  # the curve's sidecar, saved with the state at step 4

    resumed, resumed_losses, resumed_curve = run(checkpoint)
    assert resumed_losses == losses and resumed_curve == curve
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
