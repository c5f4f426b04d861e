"""hf_linattn models: a Llama/Qwen decoder whose layers mix linear (gla/gdn/rla/rdn) and softmax attention.

This folder is also the remote code of saved checkpoints: ``save_pretrained`` assembles it into a
flat folder (export.py), so nothing here needs hf_linattn installed once saved. It runs under every
transformers release of the supported window: the cache argument is ``cache`` (transformers >= 5.24)
or ``past_key_values`` (older; deprecated until 5.40), and both are accepted.
"""

from __future__ import annotations

import inspect
import math
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import (
    create_causal_mask,
    create_recurrent_attention_mask,
    create_sliding_window_causal_mask,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .cache_linattn import LinAttnCache
from .configuration_linattn import LINEAR_LAYER_TYPES, TRANSFORMERS_LINEAR_TYPE, LinAttnConfig
from .export import push_folder, split_hub_kwargs, write_remote_code
from .layers_linattn import LinAttnMLP, LinAttnRMSNorm, LinAttnRotaryEmbedding, LinAttnSoftmaxAttention
from .linear_attention_linattn import LinAttnLinearAttention, packed_sequence_starts
from .static_cache_linattn import LinAttnStaticCache

logger = logging.get_logger(__name__)

# The name transformers' generate() gives the cache in the model inputs, and the output field that returns it:
# "cache" from transformers 5.24 on, "past_key_values" before.
GENERATE_CACHE_KWARG = (
    "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values"
)  # fmt: skip
OUTPUT_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

# which transformers mask function serves each softmax layer type (one mask per layer type per forward)
MASK_FUNCTIONS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


def resolve_cache_argument(cache, past_key_values):
    """The cache under either name (``past_key_values`` is transformers' name before 5.24); one clear error if both."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache once: as `cache` (transformers >= 5.24) or as `past_key_values`, not both")
    cache = cache if cache is not None else past_key_values
    if cache is not None and not isinstance(cache, LinAttnCache | LinAttnStaticCache):
        raise TypeError(
            f"the cache must be a LinAttnCache (got {type(cache).__name__}); let generate() create it, "
            "or pass LinAttnCache(model.config)"
        )
    return cache


class LinAttnDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm residual block: mixer (linear or softmax attention by `mixer_types`) then SwiGLU MLP."""

    def __init__(self, config: LinAttnConfig, layer_idx: int):
        super().__init__()
        self.mixer_type = config.mixer_types[layer_idx]
        self.layer_type = config.layer_types[layer_idx]  # transformers' name: picks the mask
        self.is_linear = self.mixer_type in LINEAR_LAYER_TYPES
        self.self_attn = (LinAttnLinearAttention if self.is_linear else LinAttnSoftmaxAttention)(config, layer_idx)
        self.mlp = LinAttnMLP(config)
        self.input_layernorm = LinAttnRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = LinAttnRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: LinAttnCache | None = None,
        sequence_starts: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, T, D] -> [B, T, D], and the attention weights of an eager softmax layer (else None)."""
        residual = hidden_states
        normed = self.input_layernorm(hidden_states)
        if self.is_linear:
            mixed, weights = self.self_attn(normed, position_embeddings, attention_mask, cache, sequence_starts)
        else:
            mixed, weights = self.self_attn(normed, position_embeddings, attention_mask, cache, **kwargs)
        hidden_states = residual + mixed
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states)), weights


class LinAttnPreTrainedModel(PreTrainedModel):
    config_class = LinAttnConfig
    config: LinAttnConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LinAttnDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    # Not stateful in transformers' sense: LinAttnCache rolls back exactly (crop), so assisted generation,
    # prompt lookup and lookahead are allowed.
    _is_stateful = False

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        """As transformers' save_pretrained, into a flat folder with the remote code (export.py) before any push;
        auto_map also names the base model, so AutoModel loads it too."""
        if self._auto_class is not None:
            auto_map = getattr(self.config, "auto_map", None) or {}
            self.config.auto_map = {**auto_map, "AutoModel": "modeling_linattn.LinAttnModel"}
        save_kwargs, hub_kwargs = split_hub_kwargs(kwargs)
        super().save_pretrained(save_directory, **save_kwargs)
        if self._auto_class is not None:
            write_remote_code(save_directory, [Path(sys.modules[type(self).__module__].__file__)])
        if push_to_hub:
            push_folder(save_directory, **hub_kwargs)

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

    def _masks(self, inputs_embeds, attention_mask, cache, position_ids) -> dict[str, torch.Tensor | None]:
        """One mask per layer type present, from transformers' masking utilities (or as generate() prepared them)."""
        if isinstance(attention_mask, dict):
            return attention_mask
        masks = {}
        for layer_type in set(self.config.layer_types):
            # positional: the cache argument is `cache` from transformers 5.24 on, `past_key_values` before
            if layer_type == TRANSFORMERS_LINEAR_TYPE:  # a padding mask, sized to this forward's tokens
                masks[layer_type] = create_recurrent_attention_mask(self.config, inputs_embeds, attention_mask, cache)
            else:
                mask_function = MASK_FUNCTIONS[layer_type]
                masks[layer_type] = mask_function(self.config, inputs_embeds, attention_mask, cache, position_ids)
        return masks

    def _attentions(self, weights: list[torch.Tensor | None]) -> tuple:
        """The attention weights of the softmax layers (as Qwen3-Next; None unless eager). A stack without softmax
        layers has none: one None per layer, as a model whose attention backend returns no weights."""
        return tuple(weights) if self.config.has_softmax_layers else (None,) * len(self.layers)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: LinAttnCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: LinAttnCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """input_ids [B, T] (or inputs_embeds [B, T, D]); attention_mask [B, past + T] with 0 at padding.

        ``cache`` (or, before transformers 5.24, ``past_key_values``) continues from earlier tokens. Packed rows
        (position_ids restarting at 0 inside a row, no attention_mask, no cache) keep their sequences apart.
        ``kwargs`` go to the softmax attention backends (e.g. flash-attention's cu_seqlens).
        """
        cache = resolve_cache_argument(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        config = self.config
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = use_cache if use_cache is not None else (config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and (use_cache or cache):
            logger.warning_once("gradient checkpointing recomputes layers, so it runs without a cache")
            use_cache, cache = False, None
        if use_cache and cache is None:
            cache = LinAttnCache(config)
        B, T, _ = inputs_embeds.shape
        past_length = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + T, device=inputs_embeds.device)[None]
        masks = self._masks(inputs_embeds, attention_mask, cache, position_ids)
        starts = None
        if cache is None and attention_mask is None:  # a packed training batch, as transformers detects it
            starts = packed_sequence_starts(position_ids.expand(B, -1))
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        hidden_states = inputs_embeds
        all_hidden, all_attentions = [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, weights = layer(
                hidden_states, position_embeddings, attention_mask=masks[layer.layer_type], cache=cache,
                sequence_starts=starts, **kwargs,
            )  # fmt: skip
            if output_attentions and not layer.is_linear:
                all_attentions.append(weights)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=self._attentions(all_attentions) if output_attentions else None,
            **{OUTPUT_CACHE_FIELD: cache},
        )
        return output if return_dict is not False else output.to_tuple()


class LinAttnForCausalLM(LinAttnPreTrainedModel, GenerationMixin):
    """[`LinAttnModel`] with a language-modeling head; works with `generate()` (greedy, sampling, beam search,
    assisted decoding, prompt lookup)."""

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

    def adjust_generation_fn(self, *args, **kwargs) -> None:
        """transformers' from_pretrained hook; a checkpoint's ``custom_generate/`` folder (lookahead decoding) stays
        opt-in (``generate(custom_generate=repo_id)``) instead of replacing ``generate()`` for every load with
        trust_remote_code, so sampling and beam search keep working."""
        super().adjust_generation_fn(*args, **kwargs)
        self.__dict__.pop("generate", None)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own LinAttnCache

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ) -> None:
        """generate() hook: a fresh LinAttnCache per call (a static one for ``cache_implementation="static"``),
        stored under the name this transformers release uses. A draft model's cache records from the start,
        since its drafted tokens are undone with crop()."""
        if model_kwargs.get(GENERATE_CACHE_KWARG) is not None:
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
        if generation_config.use_cache is False:
            return None
        if generation_config.cache_implementation == "static":
            cache = LinAttnStaticCache(
                self.config, max_cache_len=max(max_cache_length, getattr(generation_config, "max_cache_len", None) or 0)
            )
        elif generation_config.cache_implementation is not None:
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported by hf_linattn "
                "models; use the default (dynamic) or 'static'"
            )
        else:
            cache = LinAttnCache(self.config)
        if getattr(generation_config, "is_assistant", False):
            cache.activate_past_recording()
        model_kwargs[GENERATE_CACHE_KWARG] = cache
        return None

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, next_sequence_length: int | None = None,
                                      **kwargs):  # fmt: skip
        """transformers' own, plus one case: continuing from a returned cache with the full sequence when every
        layer is linear (transformers >= 5.24 slices the new tokens only if some layer is not linear)."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if next_sequence_length is None and cache is not None and kwargs.get("inputs_embeds") is None:
            past, mask = cache.get_seq_length(), kwargs.get("attention_mask")
            if 0 < past < input_ids.shape[1] and (mask is None or mask.shape[1] == input_ids.shape[1]):
                next_sequence_length = input_ids.shape[1] - past
        return super().prepare_inputs_for_generation(input_ids, next_sequence_length=next_sequence_length, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: LinAttnCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: LinAttnCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits [B, T, vocab] (only the last `logits_to_keep` positions if > 0); loss if labels are given.

        ``kwargs``: transformers' loss keywords (e.g. num_items_in_batch) and attention-backend keywords.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=resolve_cache_argument(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **{k: v for k, v in kwargs.items() if k != "num_items_in_batch"},
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
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{OUTPUT_CACHE_FIELD: getattr(outputs, OUTPUT_CACHE_FIELD)},
        )
        return output if return_dict is not False else output.to_tuple()


__all__ = ["LinAttnForCausalLM", "LinAttnModel", "LinAttnPreTrainedModel"]
