"""Stage 1: training the new linear-layer pieces lowers every layer's error against the base attention."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from hf_linattn.assets import TEACHER_DIR
from hf_linattn.cli import ATTENTION_TRANSFER_PARAMS as CLI_ATTENTION_TRANSFER_PARAMS
from hf_linattn.conversion import linearize
from hf_linattn.conversion.attention_transfer import (
    ATTENTION_TRANSFER_PARAMS,
    attention_transfer,
    layer_errors,
    new_parameters,
    stage1_parameters,
)

from .conftest import convert_cli
from .test_transfer import llama, randomize


def test_attention_transfer_lowers_every_layer_error_and_freezes_transferred_weights():
    base = randomize(llama())
    model = linearize(base, ["rdn", "gdn", "full_attention", "rla"], linear_output_gate=True, linear_output_norm=True)
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(1, 101, (4, 48), generator=gen) for _ in range(60)]  # fresh data every step
    held_out = torch.randint(1, 101, (4, 48), generator=gen)
    frozen = {n: p.clone() for n, p in model.named_parameters() if "layers.0.self_attn.q_proj" in n or "mlp" in n}

    before = layer_errors(base, model, held_out)
    history = attention_transfer(base, model, batches, steps=60, lr=1e-2, progress=False)
    after = layer_errors(base, model, held_out)

    assert set(before) == {0, 1, 3}, "only linear layers are trained and measured"
    for i in before:
        assert after[i] < 0.9 * before[i], (i, before[i], after[i])
    assert history[-1] < history[0]
    for name, value in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name
    layer = model.model.layers[0].self_attn
    names = {n for n, p in layer.named_parameters() if any(p is q for q in new_parameters(layer))}
    assert "conv1d.weight" in names and "A_log" in names and "c_proj.weight" in names
    assert not any(n.startswith(("q_proj", "k_proj", "v_proj", "o_proj")) for n in names)


@pytest.mark.parametrize("train", ["qk", "all"])
def test_attention_transfer_can_train_the_transferred_projections(train):
    """qk also trains q/k (a learned feature map); all trains every attention weight (RADLADS); MLPs stay."""
    base = randomize(llama())
    model = linearize(base, ["rdn", "full_attention", "gdn", "rla"])
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randint(1, 101, (2, 32), generator=gen) for _ in range(8)]
    before = {n: p.clone() for n, p in model.named_parameters()}
    attention_transfer(base, model, batches, steps=8, lr=1e-2, progress=False, train=train)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}

    trained = ("q_proj", "k_proj") + (("v_proj", "o_proj") if train == "all" else ())
    for i in (0, 2, 3):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert (f"model.layers.{i}.self_attn.{proj}.weight" in changed) == (proj in trained), (i, proj)
    assert not any(".layers.1." in n or "mlp" in n or "embed" in n for n in changed), "softmax layer or MLP moved"
    assert set(stage1_parameters(model.model.layers[0].self_attn, train)) >= {"conv1d.weight", "A_log", "q_proj.weight"}


def test_unknown_stage1_parameter_set_is_refused():
    layer = linearize(randomize(llama()), ["rdn"] * 4).model.layers[0].self_attn
    with pytest.raises(ValueError, match="expected one of"):
        stage1_parameters(layer, "everything")


def test_the_cli_offers_the_stage1_parameter_sets():
    assert tuple(CLI_ATTENTION_TRANSFER_PARAMS) == tuple(ATTENTION_TRANSFER_PARAMS)


def test_a_conversion_carries_stage1_trained_projections_into_linear_layers_only(tmp_path):
    """Through the CLI, no stage 2: linear layers hold their stage-1 q/k/v/o, the kept softmax layer the base's."""
    out = tmp_path / "all"
    report = convert_cli(out, "--keep-softmax-layers", "3", "--attention-transfer-params", "all", "--lora-steps", "0")
    assert report["recipe"]["attention_transfer_params"] == "all"
    student = load_file(out / "model.safetensors")
    teacher = load_file(TEACHER_DIR / "model.safetensors")
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        name = f"model.layers.{{}}.self_attn.{proj}.weight"
        assert torch.equal(student[name.format(3)], teacher[name.format(3)]), proj
        for i in (0, 5):
            assert not torch.equal(student[name.format(i)], teacher[name.format(i)]), (i, proj)
    assert "every attention weight trained too (RADLADS), copied weights at lr 0.003" in (out / "README.md").read_text()


def test_copied_weights_train_at_their_own_learning_rate():
    """The copied q/k/v/o start trained, so they get their own (lower) peak: here so low they barely move."""
    base = randomize(llama())
    model = linearize(base, ["rdn"] * 4)
    gen = torch.Generator().manual_seed(6)
    batches = [torch.randint(1, 101, (2, 32), generator=gen) for _ in range(4)]
    before = {n: p.clone() for n, p in model.named_parameters()}
    attention_transfer(base, model, batches, steps=4, lr=1e-2, progress=False, train="all", weights_lr=1e-9)
    moved = {n: (p - before[n]).abs().max().item() for n, p in model.named_parameters()}
    for i in range(4):
        assert 0 < moved[f"model.layers.{i}.self_attn.v_proj.weight"] < 1e-7
        assert moved[f"model.layers.{i}.self_attn.conv1d.weight"] > 1e-4
