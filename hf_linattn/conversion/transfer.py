"""Weight transfer from a Llama / Qwen2 / Qwen3 checkpoint into an hf_linattn model.

The first step of linearization: the target config mirrors the base backbone exactly, every
backbone weight is copied, and each attention layer either stays softmax (its weights copied as
they are) or becomes a linear-attention layer that reuses the base q/k/v/o projections (and
Qwen3's q/k norms). The linear layers' new pieces (short conv, gates) keep their own init:
the conv starts as the identity. ``init_gates_from_keys`` optionally starts the decay gates from
the base's key projection instead (Liger).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from hf_linattn.errors import InputError
from hf_linattn.modeling import LINEAR_LAYER_TYPES, LinAttnConfig, LinAttnForCausalLM

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# how the decay gates' input projection starts: the model's own random init, or pooled from the keys (Liger)
GATE_INITS = ("random", "keys")


class UnsupportedBaseModelError(InputError, ValueError):
    """The base checkpoint's architecture cannot be linearized."""


def _check_supported(base_config: PreTrainedConfig) -> str:
    model_type = getattr(base_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedBaseModelError(
            f"cannot linearize model_type {model_type!r}: supported base architectures are "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)"
        )
    return model_type


def linear_config_from_base(
    base_config: PreTrainedConfig,
    layer_types: list[str],
    linear_use_rotary: bool = False,
    linear_output_gate: bool = False,
    linear_output_norm: bool = False,
    residual_clip: float = 1.0,
) -> LinAttnConfig:
    """A LinAttnConfig with the base backbone and the given `layer_types` (one per base layer).

    Softmax entries must match what the base layer is ("full_attention", or "sliding_attention"
    where the base slides). Linear layers take the base attention shapes, so q/k/v/o transfer as is.
    """
    model_type = _check_supported(base_config)
    n = base_config.num_hidden_layers
    if len(layer_types) != n:
        raise ValueError(f"layer_types has {len(layer_types)} entries; the base model has {n} layers")
    base_types = list(getattr(base_config, "layer_types", None) or ["full_attention"] * n)
    for i, (new, old) in enumerate(zip(layer_types, base_types)):
        if new not in LINEAR_LAYER_TYPES and new != old:
            raise ValueError(
                f"layer {i} is {old!r} in the base model; it can stay {old!r} or become linear, not {new!r}"
            )
    head_dim = getattr(base_config, "head_dim", None) or base_config.hidden_size // base_config.num_attention_heads
    qkv_bias = True if model_type == "qwen2" else bool(getattr(base_config, "attention_bias", False))
    out_bias = False if model_type == "qwen2" else bool(getattr(base_config, "attention_bias", False))
    return LinAttnConfig(
        vocab_size=base_config.vocab_size,
        hidden_size=base_config.hidden_size,
        intermediate_size=base_config.intermediate_size,
        num_attention_heads=base_config.num_attention_heads,
        num_key_value_heads=base_config.num_key_value_heads,
        head_dim=head_dim,
        hidden_act=base_config.hidden_act,
        max_position_embeddings=base_config.max_position_embeddings,
        rms_norm_eps=base_config.rms_norm_eps,
        rope_parameters=dict(base_config.rope_parameters),
        attention_bias=qkv_bias,
        attention_output_bias=out_bias,
        mlp_bias=bool(getattr(base_config, "mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        tie_word_embeddings=bool(base_config.tie_word_embeddings),
        mixer_types=list(layer_types),
        sliding_window=getattr(base_config, "sliding_window", None),
        linear_num_heads=base_config.num_attention_heads,
        linear_num_key_value_heads=base_config.num_key_value_heads,
        linear_key_head_dim=head_dim,
        linear_value_head_dim=head_dim,
        linear_use_rotary=linear_use_rotary,
        linear_output_gate=linear_output_gate,
        linear_output_norm=linear_output_norm,
        residual_clip=residual_clip,
        bos_token_id=base_config.bos_token_id,
        eos_token_id=base_config.eos_token_id,
        pad_token_id=base_config.pad_token_id,
    )


@torch.no_grad()
def transfer_weights(base: PreTrainedModel, target: LinAttnForCausalLM) -> list[str]:
    """Copy every base weight into ``target`` (same names: both follow Llama's layout).

    Returns the target parameters that received no base weight (the new linear-layer pieces).
    Raises if a base weight has no place in the target or a shape differs.
    """
    _check_supported(base.config)
    base_state = base.state_dict()
    target_params = dict(target.named_parameters())
    if target.config.tie_word_embeddings:
        base_state.pop("lm_head.weight", None)
    unplaced = [name for name in base_state if name not in target_params and "rotary_emb" not in name]
    if unplaced:
        raise ValueError(f"base weights with no place in the converted model: {unplaced[:5]}")
    for name, tensor in base_state.items():
        if name in target_params:
            param = target_params[name]
            if param.shape != tensor.shape:
                raise ValueError(f"{name}: base shape {tuple(tensor.shape)} != converted shape {tuple(param.shape)}")
            param.copy_(tensor.to(param.dtype))
    return sorted(name for name in target_params if name not in base_state)


@torch.no_grad()
def init_gates_from_keys(model: LinAttnForCausalLM) -> int:
    """Start every linear layer's decay-gate input from its key projection, as Liger builds gates (no new weights).

    The gate pre-activation of head h becomes the mean of its key head's pre-norm keys: row h of
    ``a_proj`` [H, hidden] is the mean of that key head's ``key_dim`` rows of ``k_proj``, and a key
    bias (Qwen2) moves into ``dt_bias``. The decay rates ``A_log`` keep their spread. Returns the
    number of layers changed.
    """
    changed = 0
    for layer, kind in zip(model.model.layers, model.config.mixer_types):
        if kind not in LINEAR_LAYER_TYPES:
            continue
        attn = layer.self_attn
        heads, kv_heads, key_dim = attn.num_heads, attn.num_kv_heads, attn.key_dim
        kv_of_head = torch.arange(heads) // (heads // kv_heads)
        pooled = attn.k_proj.weight.view(kv_heads, key_dim, -1).mean(1)  # [kv_heads, hidden]
        attn.a_proj.weight.copy_(pooled[kv_of_head].to(attn.a_proj.weight.dtype))
        if attn.k_proj.bias is not None:
            attn.dt_bias.add_(attn.k_proj.bias.view(kv_heads, key_dim).mean(1)[kv_of_head].to(attn.dt_bias.dtype))
        changed += 1
    return changed


def linearize(base: PreTrainedModel, layer_types: list[str], **config_overrides) -> LinAttnForCausalLM:
    """A LinAttnForCausalLM with ``layer_types`` whose backbone and attention weights come from ``base``."""
    config = linear_config_from_base(base.config, layer_types, **config_overrides)
    model = LinAttnForCausalLM(config).to(base.dtype)
    transfer_weights(base, model)
    return model.eval() if not base.training else model
