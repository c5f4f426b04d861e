"""Stage 2: PEFT LoRA recovery lowers the loss, saves the adapter, merges into a plain model."""

from __future__ import annotations

import json

import pytest
import torch

from hf_linattn import LinAttnForCausalLM
from hf_linattn.conversion import NonFiniteLossError, linearize, lora_recover, recovery_loss

from .test_transfer import llama, randomize


def converted():
    base = randomize(llama())
    return base, linearize(base, ["rdn", "rdn", "full_attention", "gla"], linear_output_gate=True)


def held_out_loss(model, base, ids, loss):
    with torch.no_grad():
        return recovery_loss(model(ids).logits, ids, base(ids).logits, loss).item()


@pytest.mark.parametrize("loss", ["ce", "kl", "ce+kl"])
def test_lora_recovery_lowers_the_loss_and_merges(loss, tmp_path):
    base, model = converted()
    gen = torch.Generator().manual_seed(5)
    # a learnable signal: the next token is a fixed function of the current one
    batches = []
    for _ in range(8):
        start = torch.randint(1, 101, (4, 1), generator=gen)
        batches.append((start + torch.arange(40) * 7) % 100 + 1)
    before = held_out_loss(model, base, batches[0], loss)
    merged, history = lora_recover(model, batches, steps=30, teacher=base, loss=loss, lr=1e-2,
                                   include_mlp=True, adapter_dir=tmp_path / "adapter", progress=False)  # fmt: skip
    assert isinstance(merged, LinAttnForCausalLM)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert history[-1] < history[0]
    assert held_out_loss(merged, base, batches[0], loss) < before
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and set(adapter["target_modules"]) >= {"q_proj", "o_proj", "up_proj"}
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_kl_needs_a_teacher_with_the_same_vocabulary():
    base, model = converted()
    with pytest.raises(ValueError, match="needs the teacher"):
        lora_recover(model, [torch.ones(1, 4, dtype=torch.long)], steps=1, loss="kl", progress=False)
    base.config.vocab_size = 50
    with pytest.raises(ValueError, match="same tokenizer"):
        lora_recover(model, [torch.ones(1, 4, dtype=torch.long)], steps=1, teacher=base, loss="kl", progress=False)


def test_a_nan_loss_stops_with_the_last_good_parameters():
    _, model = converted()
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(NonFiniteLossError, match="step 0"):
        lora_recover(model, [torch.ones(1, 8, dtype=torch.long)], steps=3, progress=False)
    after = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
             for n, p in model.named_parameters() if "lora_" not in n}  # fmt: skip
    for name, value in before.items():
        assert torch.equal(after[name], value) or torch.isnan(value).any(), name


def test_train_mixers_also_trains_the_new_pieces_in_full():
    """With train_mixers the gates and conv of the linear layers move; without, they stay as stage 1 left them."""
    batches = [torch.randint(1, 101, (2, 24), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    moved = {}
    for flag in (False, True):
        base, model = converted()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        merged, _ = lora_recover(model, batches, steps=3, teacher=base, loss="kl", lr=1e-2, train_mixers=flag,
                                 progress=False)  # fmt: skip
        after = dict(merged.named_parameters())
        layer = "model.layers.0.self_attn."
        moved[flag] = {n for n in ("a_proj.weight", "b_proj.weight", "conv1d.weight", "A_log", "g_proj.weight")
                       if not torch.equal(after[layer + n], before[layer + n])}  # fmt: skip
        assert not torch.equal(
            after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"]
        )  # the merged LoRA, either way
    assert moved[False] == set()
    assert moved[True] == {"a_proj.weight", "b_proj.weight", "conv1d.weight", "A_log", "g_proj.weight"}
