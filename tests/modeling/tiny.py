"""Tiny hf_linattn models for the modeling and generation tests."""

from __future__ import annotations

import torch

from hf_linattn import LinAttnConfig, LinAttnForCausalLM

VOCAB = 97
HYBRID = ["rdn", "sliding_attention", "gla", "full_attention", "rla", "gdn"]
STACKS = {
    "gla": ["gla", "gla"],
    "gdn": ["gdn", "gdn"],
    "rla": ["rla", "rla"],
    "rdn": ["rdn", "rdn"],
    "hybrid": HYBRID,
}


def tiny_config(layer_types: list[str], **overrides) -> LinAttnConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=layer_types,
        sliding_window=5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        residual_clip=0.5,
    )
    kwargs.update(overrides)
    return LinAttnConfig(**kwargs)


def tiny_model(layer_types: list[str], seed: int = 0, **overrides) -> LinAttnForCausalLM:
    """A random tiny model whose gates are spread so that decay, writes and clipping all matter."""
    torch.manual_seed(seed)
    model = LinAttnForCausalLM(tiny_config(layer_types, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.weight") or name.endswith("embed_tokens.weight"):
                p.normal_(0, 0.3)  # larger than the 0.02 init, so that logits differ clearly between tokens
            if name.endswith("A_log"):
                p.uniform_(-2.0, 0.5)
    return model


def prompt(batch: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=gen)


def spread_projections(model):
    """Re-draw projection and embedding weights at std 0.3 (for plain transformers models in the tests),
    so that logits differ clearly between tokens. Returns the model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.weight") or name.endswith("embed_tokens.weight"):
                p.normal_(0, 0.3)
    return model
