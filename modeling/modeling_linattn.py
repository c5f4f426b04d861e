"""hf_linattn models: a Llama/Qwen decoder whose layers mix linear (gla/gdn/rla/rdn) and softmax attention.

This folder is also the remote code of saved checkpoints: transformers copies this file and its
same-folder relative imports, so nothing here imports hf_linattn by name.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .cache_linattn import LinAttnCache
from .configuration_linattn import LINEAR_LAYER_TYPES, LinAttnConfig
from .export import write_remote_code
from .layers_linattn import (
    LinAttnLinearAttention,
    LinAttnMLP,
    LinAttnRMSNorm,
    LinAttnRotaryEmbedding,
    LinAttnSoftmaxAttention,
)


class LinAttnDecoderLayer(nn.Module):
    """Pre-norm residual block: mixer (linear or softmax attention by `layer_types`) then SwiGLU MLP."""

    def __init__(self, config: LinAttnConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        mixer = LinAttnLinearAttention if self.layer_type in LINEAR_LAYER_TYPES else LinAttnSoftmaxAttention
        self.self_attn = mixer(config, layer_idx)
        self.mlp = LinAttnMLP(config)
        self.input_layernorm = LinAttnRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = LinAttnRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: LinAttnCache | None,
        past_length: int,
    ) -> torch.Tensor:
        """[B, T, D] -> [B, T, D]."""
        residual = hidden_states
        hidden_states = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache, past_length
        )
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LinAttnPreTrainedModel(PreTrainedModel):
    config_class = LinAttnConfig
    config: LinAttnConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LinAttnDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    # Not stateful in transformers' sense: LinAttnCache rolls back exactly (crop), so assisted generation,
    # prompt lookup and lookahead are allowed.
    _is_stateful = False

    def save_pretrained(self, save_directory, **kwargs):
        """As transformers' save_pretrained; auto_map also names the base model, so AutoModel loads it too."""
        if self._auto_class is not None:
            auto_map = getattr(self.config, "auto_map", None) or {}
            self.config.auto_map = {**auto_map, "AutoModel": "modeling_linattn.LinAttnModel"}
        super().save_pretrained(save_directory, **kwargs)
        if self._auto_class is not None:
            write_remote_code(save_directory, [Path(sys.modules[type(self).__module__].__file__)])

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LinAttnLinearAttention):
            # decay rates spread over heads as in Mamba2 / Gated DeltaNet: A in [1, 16], dt in [1e-3, 1e-1]
            heads = module.num_heads
            init.copy_(module.A_log, torch.empty(heads).uniform_(1, 16).log())
            log_dt = torch.rand(heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)
            dt = log_dt.exp().clamp(min=1e-4)
            init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            # the short conv starts as the identity (weight 1 on the current token)
            weight = torch.zeros_like(module.conv1d.weight)
            weight[..., -1] = 1.0
            init.copy_(module.conv1d.weight, weight)
        elif isinstance(module, LinAttnRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, LinAttnRotaryEmbedding):
            # a non-persistent buffer: from_pretrained builds the model on the meta device, so recompute it
            init.copy_(module.inv_freq, module.compute_inv_freq(module.config)[0])


class LinAttnModel(LinAttnPreTrainedModel):
    """The decoder stack without the LM head."""

    def __init__(self, config: LinAttnConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(LinAttnDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LinAttnRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LinAttnRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: LinAttnCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """input_ids [B, T] (or inputs_embeds [B, T, D]); attention_mask [B, past + T] with 0 at padding.

        Extra keyword arguments from generate()/Trainer (e.g. output_attentions) are accepted and ignored.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and past_key_values is None:
            past_key_values = LinAttnCache(self.config)
        if past_key_values is not None and not isinstance(past_key_values, LinAttnCache):
            raise TypeError(
                f"past_key_values must be a LinAttnCache (got {type(past_key_values).__name__}); "
                "let generate() create it, or pass LinAttnCache(model.config)"
            )
        B, T, _ = inputs_embeds.shape
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < past_length + T:
                raise ValueError(
                    f"attention_mask must be 2D [batch, past + new] = [{B}, >= {past_length + T}]; "
                    f"got {tuple(attention_mask.shape)}"
                )
            attention_mask = attention_mask[:, : past_length + T]
            if bool(attention_mask.all()):
                attention_mask = None  # nothing to mask: take the unmasked fast path
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + T, device=inputs_embeds.device).expand(B, T)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        hidden_states = inputs_embeds
        all_hidden_states = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            if self.gradient_checkpointing and self.training and past_key_values is None:
                hidden_states = self._gradient_checkpointing_func(
                    layer.__call__, hidden_states, position_embeddings, attention_mask, None, past_length
                )
            else:
                hidden_states = layer(hidden_states, position_embeddings, attention_mask, past_key_values, past_length)
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
        if past_key_values is not None:
            past_key_values.advance(T)
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
        )
        return output if return_dict is not False else output.to_tuple()


class LinAttnForCausalLM(LinAttnPreTrainedModel, GenerationMixin):
    """[`LinAttnModel`] with a language-modeling head; works with `generate()` (greedy, sampling, beam search)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LinAttnConfig):
        super().__init__(config)
        self.model = LinAttnModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own LinAttnCache

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ) -> None:
        """generate() hook: give every call a fresh LinAttnCache unless the user passed one.

        A draft model's cache records from the start, since its drafted tokens are undone with crop().
        """
        if model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False:
            model_kwargs["past_key_values"] = LinAttnCache(self.config)
            if getattr(generation_config, "is_assistant", False):
                model_kwargs["past_key_values"].activate_past_recording()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: LinAttnCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits [B, T, vocab] (only the last `logits_to_keep` positions if > 0); loss if labels are given."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
        )
        return output if return_dict is not False else output.to_tuple()


__all__ = ["LinAttnForCausalLM", "LinAttnModel", "LinAttnPreTrainedModel"]
