"""Configuration of hf_linattn models: a Llama/Qwen backbone whose layers mix linear and softmax attention."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedConfig

from hf_linattn.kernels.modes import MODES

from .export import write_remote_code

LINEAR_LAYER_TYPES = MODES
SOFTMAX_LAYER_TYPES = ("full_attention", "sliding_attention")
LAYER_TYPES = LINEAR_LAYER_TYPES + SOFTMAX_LAYER_TYPES


class LinAttnConfig(PreTrainedConfig):
    r"""Config of [`LinAttnModel`] / [`LinAttnForCausalLM`].

    The backbone fields follow `LlamaConfig` / `Qwen3Config` (RMSNorm, SwiGLU MLP, grouped-query
    attention, rotary, optional q/k biases and per-head q/k RMSNorm), so converted checkpoints map
    one to one (`attention_bias` covers q/k/v and, unless `attention_output_bias` says otherwise, o).
    `layer_types` picks the mixer of every layer:

    - "gla", "gdn", "rla", "rdn": linear attention of that mode (arXiv 2509.25223 for rla/rdn);
    - "full_attention", "sliding_attention": softmax attention (the latter over `sliding_window` tokens).

    Linear layers use `linear_num_heads` query heads, `linear_num_key_value_heads` key/value heads
    (shared by groups, as in GQA), key dim `linear_key_head_dim` and value dim `linear_value_head_dim`,
    a causal depthwise conv of `linear_conv_size` taps, the residual clip bound `residual_clip`, and
    rotary on q/k only if `linear_use_rotary`.

    Example:
        >>> config = LinAttnConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128,
        ...                        layer_types=["rdn", "rdn", "rdn", "full_attention"])
    """

    model_type = "hf_linattn"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int | None = None
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_output_bias: bool | None = None
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    qk_norm: bool = False
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    linear_num_heads: int | None = None
    linear_num_key_value_heads: int | None = None
    linear_key_head_dim: int | None = None
    linear_value_head_dim: int | None = None
    linear_conv_size: int = 4
    residual_clip: float = 1.0
    linear_use_rotary: bool = False
    linear_output_gate: bool = True
    linear_output_norm: bool = True

    def __post_init__(self, **kwargs):
        if self.layer_types is None:
            self.layer_types = ["rdn"] * (self.num_hidden_layers or 2)
        self.layer_types = list(self.layer_types)
        self._check_layer_types()  # before transformers remaps legacy names ("mamba" -> "linear_attention")
        if self.num_hidden_layers is None:
            self.num_hidden_layers = len(self.layer_types)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.attention_output_bias is None:
            self.attention_output_bias = self.attention_bias  # Llama: one flag for q/k/v/o; Qwen2: q/k/v only
        if self.head_dim is None and self.num_attention_heads and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.linear_num_heads is None:
            self.linear_num_heads = self.num_attention_heads
        if self.linear_num_key_value_heads is None:
            self.linear_num_key_value_heads = (
                self.num_key_value_heads if self.linear_num_heads == self.num_attention_heads else self.linear_num_heads
            )
        if self.linear_key_head_dim is None:
            self.linear_key_head_dim = self.head_dim
        if self.linear_value_head_dim is None:
            self.linear_value_head_dim = self.head_dim
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": kwargs.pop("rope_theta", 10000.0)}
        super().__post_init__(**kwargs)
        self._check()

    def _check_layer_types(self) -> None:
        unknown = [(i, t) for i, t in enumerate(self.layer_types) if t not in LAYER_TYPES]
        if unknown:
            i, t = unknown[0]
            raise ValueError(f"layer_types[{i}] = {t!r} is not a known layer type; expected one of {LAYER_TYPES}")

    def _check(self) -> None:
        """One clear error per invalid value, raised at construction."""
        self._check_layer_types()
        if self.num_hidden_layers != len(self.layer_types):
            raise ValueError(
                f"num_hidden_layers ({self.num_hidden_layers}) must equal len(layer_types) ({len(self.layer_types)})"
            )
        if self.head_dim is None:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}); set head_dim explicitly"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "linear_num_heads", "linear_num_key_value_heads", "linear_key_head_dim",
                     "linear_value_head_dim", "linear_conv_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.linear_num_heads % self.linear_num_key_value_heads:
            raise ValueError(
                f"linear_num_heads ({self.linear_num_heads}) must be a multiple of "
                f"linear_num_key_value_heads ({self.linear_num_key_value_heads})"
            )
        if (self.has_softmax_layers or self.linear_use_rotary) and self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even to apply rotary embeddings")
        if self.linear_use_rotary and self.linear_key_head_dim != self.head_dim:
            raise ValueError(
                f"linear_use_rotary needs linear_key_head_dim ({self.linear_key_head_dim}) "
                f"== head_dim ({self.head_dim})"
            )
        if "sliding_attention" in self.layer_types and (
            not isinstance(self.sliding_window, int) or self.sliding_window < 1
        ):
            raise ValueError(f"sliding_attention layers need sliding_window >= 1; got {self.sliding_window!r}")
        if not self.residual_clip > 0:
            raise ValueError(f"residual_clip must be > 0; got {self.residual_clip!r}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (SwiGLU MLP); got {self.hidden_act!r}")
        if not isinstance(self.rope_parameters, dict) or "rope_theta" not in self.rope_parameters:
            raise ValueError(
                f"rope_parameters must be a dict with 'rope_type' and 'rope_theta'; got {self.rope_parameters!r}"
            )

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """As transformers' save_pretrained; the remote code is assembled as one flat folder (export.py)."""
        super().save_pretrained(save_directory, **kwargs)
        if self._auto_class is not None:
            write_remote_code(save_directory, [Path(__file__)])

    def validate(self) -> None:
        """transformers' validators, with our layer-type check in place of its own (whose list lacks the modes)."""
        for validator in getattr(PreTrainedConfig, "__class_validators__", []):
            if validator.__name__ != "validate_layer_type":
                validator(self)
        self._check()

    @property
    def has_softmax_layers(self) -> bool:
        return any(t in SOFTMAX_LAYER_TYPES for t in self.layer_types)


__all__ = ["LAYER_TYPES", "LINEAR_LAYER_TYPES", "SOFTMAX_LAYER_TYPES", "LinAttnConfig"]
