"""Configuration of hf_linattn models: a Llama/Qwen backbone whose layers mix linear and softmax attention."""

# No `from __future__ import annotations`: the strict dataclass checks field types from the annotations.
from pathlib import Path

from transformers import PreTrainedConfig
from transformers.configuration_utils import strict  # huggingface_hub's; the remote code imports only transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from hf_linattn.kernels.modes import MODES

from .export import push_folder, split_hub_kwargs, write_remote_code

LINEAR_LAYER_TYPES = MODES
SOFTMAX_LAYER_TYPES = ("full_attention", "sliding_attention")
# the mixer of a layer, as `mixer_types` lists them
LAYER_TYPES = LINEAR_LAYER_TYPES + SOFTMAX_LAYER_TYPES
# transformers' name for the cache / mask kind of a linear layer, as `layer_types` lists them
TRANSFORMERS_LINEAR_TYPE = "linear_attention"


def transformers_layer_type(mixer_type: str) -> str:
    """transformers' layer type of a mixer: "linear_attention" for the four modes, the softmax names unchanged."""
    return TRANSFORMERS_LINEAR_TYPE if mixer_type in LINEAR_LAYER_TYPES else mixer_type


@strict
class LinAttnConfig(PreTrainedConfig):
    r"""Config of [`LinAttnModel`] / [`LinAttnForCausalLM`].

    The backbone fields follow `LlamaConfig` / `Qwen3Config` (RMSNorm, SwiGLU MLP, grouped-query
    attention, rotary, optional q/k biases and per-head q/k RMSNorm), so converted checkpoints map
    one to one (`attention_bias` covers q/k/v and, unless `attention_output_bias` says otherwise, o).

    `mixer_types` picks the mixer of every layer:

    - "gla", "gdn", "rla", "rdn": linear attention of that mode (arXiv 2509.25223 for rla/rdn);
    - "full_attention", "sliding_attention": softmax attention (the latter over `sliding_window` tokens).

    `layer_types` is the same list in transformers' vocabulary ("linear_attention" for the four
    modes), which is what transformers' masks, caches and config validation read; it is derived
    from `mixer_types`. As a shorthand, `layer_types` may be given in the mixer vocabulary
    (`layer_types=["rdn", "full_attention"]`, as older checkpoints store it).

    Linear layers use `linear_num_heads` query heads, `linear_num_key_value_heads` key/value heads
    (shared by groups, as in GQA), key dim `linear_key_head_dim` and value dim `linear_value_head_dim`,
    a causal depthwise conv of `linear_conv_size` taps, the residual clip bound `residual_clip`, and
    rotary on q/k only if `linear_use_rotary`.

    Example:
        >>> config = LinAttnConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128,
        ...                        mixer_types=["rdn", "rdn", "rdn", "full_attention"])
    """

    model_type = "hf_linattn"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int | None = None
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float | int = 0.02
    rms_norm_eps: float | int = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_output_bias: bool | None = None
    attention_dropout: float | int = 0.0
    mlp_bias: bool = False
    qk_norm: bool = False
    mixer_types: list[str] | None = None
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    linear_num_heads: int | None = None
    linear_num_key_value_heads: int | None = None
    linear_key_head_dim: int | None = None
    linear_value_head_dim: int | None = None
    linear_conv_size: int = 4
    residual_clip: float | int = 1.0
    linear_use_rotary: bool = False
    linear_output_gate: bool = True
    linear_output_norm: bool = True

    def __post_init__(self, **kwargs):
        self.mixer_types = self._resolve_mixer_types()
        self.layer_types = [transformers_layer_type(t) for t in self.mixer_types]
        if self.num_hidden_layers is None:
            self.num_hidden_layers = len(self.mixer_types)
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
        super().__post_init__(**kwargs)  # standardizes rope_parameters (rope_theta, legacy rope_scaling)

    def _resolve_mixer_types(self) -> list[str]:
        """The per-layer mixers from `mixer_types`, or from `layer_types` in either vocabulary (one clear error)."""
        given_layers = self.layer_types
        if self.mixer_types is not None:
            mixers = list(self.mixer_types)
            derived = [transformers_layer_type(t) for t in mixers]
            if given_layers is not None and list(given_layers) not in (derived, mixers):
                raise ValueError(
                    f"layer_types {list(given_layers)} does not match mixer_types {mixers}; give mixer_types only "
                    f"(layer_types is derived from it)"
                )
            return mixers
        if given_layers is None:
            return ["rdn"] * (self.num_hidden_layers or 2)
        if TRANSFORMERS_LINEAR_TYPE in given_layers:
            raise ValueError(
                f"layer_types {list(given_layers)} has {TRANSFORMERS_LINEAR_TYPE!r} layers but no mixer_types to "
                f"say which mode each one is; pass mixer_types (one of {LAYER_TYPES} per layer)"
            )
        return list(given_layers)  # the mixer vocabulary, as a shorthand (and as older checkpoints store it)

    # ---- validation: transformers' strict-dataclass hooks (every `validate_*` method runs at construction) ----
    def validate_layer_type(self) -> None:
        """Replaces transformers' check (whose list has no linear modes): mixer_types and layer_types agree."""
        if not self.mixer_types:
            raise ValueError("mixer_types (or layer_types) must list at least one layer")
        unknown = [(i, t) for i, t in enumerate(self.mixer_types) if t not in LAYER_TYPES]
        if unknown:
            i, t = unknown[0]
            raise ValueError(f"mixer_types[{i}] = {t!r} is not a known layer type; expected one of {LAYER_TYPES}")
        if self.layer_types != [transformers_layer_type(t) for t in self.mixer_types]:
            raise ValueError(f"layer_types {self.layer_types} does not match mixer_types {self.mixer_types}")
        if self.num_hidden_layers != len(self.mixer_types):
            raise ValueError(
                f"num_hidden_layers ({self.num_hidden_layers}) must equal the number of layers in mixer_types "
                f"({len(self.mixer_types)})"
            )

    def validate_linattn_shapes(self) -> None:
        """Sizes and head layouts: one clear error per invalid value."""
        if self.head_dim is None:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}); set head_dim explicitly"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "linear_num_heads", "linear_num_key_value_heads", "linear_key_head_dim",
                     "linear_value_head_dim", "linear_conv_size", "max_position_embeddings"):  # fmt: skip
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
                f"linear_use_rotary needs linear_key_head_dim ({self.linear_key_head_dim}) == "
                f"head_dim ({self.head_dim})"
            )
        if "sliding_attention" in self.mixer_types and (
            not isinstance(self.sliding_window, int) or self.sliding_window < 1
        ):
            raise ValueError(f"sliding_attention layers need sliding_window >= 1; got {self.sliding_window!r}")

    def validate_linattn_values(self) -> None:
        """Numeric settings whose bad values would otherwise give NaN or a late, obscure error."""
        if not self.residual_clip > 0:
            raise ValueError(f"residual_clip must be > 0; got {self.residual_clip!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0 (it keeps RMSNorm finite); got {self.rms_norm_eps!r}")
        if not 0 <= self.attention_dropout < 1:
            raise ValueError(f"attention_dropout must be in [0, 1); got {self.attention_dropout!r}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (SwiGLU MLP); got {self.hidden_act!r}")
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            known = ("default", *sorted(ROPE_INIT_FUNCTIONS))
            raise ValueError(f"rope_parameters['rope_type'] = {rope_type!r} is not known; expected one of {known}")

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        """As transformers' save_pretrained; the remote code is assembled as one flat folder (export.py)
        before anything is pushed."""
        save_kwargs, hub_kwargs = split_hub_kwargs(kwargs)
        super().save_pretrained(save_directory, **save_kwargs)
        if self._auto_class is not None:
            write_remote_code(save_directory, [Path(__file__)])
        if push_to_hub:
            push_folder(save_directory, **hub_kwargs)

    @property
    def has_softmax_layers(self) -> bool:
        return any(t in SOFTMAX_LAYER_TYPES for t in self.mixer_types)


__all__ = ["LAYER_TYPES", "LINEAR_LAYER_TYPES", "SOFTMAX_LAYER_TYPES", "LinAttnConfig", "transformers_layer_type"]
