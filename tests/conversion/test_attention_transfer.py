"""Stage 1: training the new linear-layer pieces lowers every layer's error against the base attention."""

from __future__ import annotations

import torch

from hf_linattn.conversion import linearize
from hf_linattn.conversion.attention_transfer import attention_transfer, layer_errors, new_parameters

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
