"""Building blocks of hf_linattn models: norms, rotary, MLP, softmax attention and the linear-attention mixer.

The mixers take the current hidden states [B, T, D] and, for generation, the cache; neither
reads any global state, so hybrid stacks are simply lists of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from hf_linattn.kernels.ops import residual_attention
from hf_linattn.kernels.recurrent import recurrent_residual_attention

from .cache_linattn import LinAttnCache
from .configuration_linattn import LinAttnConfig

# Up to this many new tokens, a decode step runs the token-by-token recurrence: a 64-token
# chunk would be mostly padding. Both paths compute the same function.
RECURRENT_DECODE_MAX_TOKENS = 16


class LinAttnRMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32 (as Llama's)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class LinAttnRotaryEmbedding(nn.Module):
    """Rotary cos/sin tables for position ids, with every rope type transformers knows (llama3, yarn, ...)."""

    def __init__(self, config: LinAttnConfig):
        super().__init__()
        self.config = config
        inv_freq, self.attention_scaling = self.compute_inv_freq(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)

    @staticmethod
    def compute_inv_freq(config: LinAttnConfig) -> tuple[torch.Tensor, float]:
        """Inverse frequencies [head_dim // 2] and the cos/sin scaling of the configured rope type."""
        rope_type = config.rope_parameters.get("rope_type", "default")
        if rope_type != "default":
            return ROPE_INIT_FUNCTIONS[rope_type](config)
        dim, base = config.head_dim, config.rope_parameters["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> cos, sin [B, T, head_dim] in x's dtype."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; cos, sin [B, T, D]."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    return x * cos + rotate_half(x) * sin


class LinAttnMLP(nn.Module):
    """SwiGLU MLP, as in Llama and Qwen."""

    def __init__(self, config: LinAttnConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def softmax_attention_mask(
    attention_mask: torch.Tensor | None,
    batch: int,
    first_query: int,
    num_queries: int,
    first_key: int,
    num_keys: int,
    window: int | None,
    device: torch.device,
) -> torch.Tensor:
    """Boolean mask [B, 1, Tq, Tk]: causal, windowed for sliding layers, padding removed.

    Positions are absolute (padding included). attention_mask is the 2D [B, >= first_key + num_keys]
    mask generate() keeps for the whole sequence. Every query may attend to itself, so padded
    query rows stay finite (their outputs are never used).
    """
    q_pos = torch.arange(first_query, first_query + num_queries, device=device)[:, None]
    k_pos = torch.arange(first_key, first_key + num_keys, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)
    allowed = allowed[None, None].expand(batch, 1, num_queries, num_keys)
    if attention_mask is not None:
        key_valid = attention_mask[:, first_key : first_key + num_keys].bool()
        allowed = allowed & key_valid[:, None, None, :]
    return allowed | (k_pos == q_pos)[None, None]


class LinAttnSoftmaxAttention(nn.Module):
    """Llama/Qwen grouped-query softmax attention; full or sliding-window (keys within `sliding_window`)."""

    def __init__(self, config: LinAttnConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.window = config.sliding_window if sliding else None
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_output_bias)
        if config.qk_norm:
            self.q_norm = LinAttnRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = LinAttnRMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: LinAttnCache | None,
        past_length: int,
    ) -> torch.Tensor:
        """hidden_states [B, T, D] -> [B, T, D]. attention_mask: 2D over past and current tokens, or None."""
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = apply_rotary(q, cos, sin).transpose(1, 2), apply_rotary(k, cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        first_key = past_length
        if cache is not None:
            k, v, first_key = cache.update_kv(self.layer_idx, k, v)
        mask = softmax_attention_mask(
            attention_mask, B, past_length, T, first_key, k.shape[2], self.window, hidden_states.device
        )
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class LinAttnLinearAttention(nn.Module):
    """Gated (residual) linear attention mixer, one of gla / gdn / rla / rdn (spec: "The layer around the op").

    q, k, v = SiLU(ShortConv(x W))  ->  L2Norm(q), L2Norm(k) per head (after optional Qwen3 q/k RMSNorm
    and optional rotary); g = -exp(A_log) softplus(x W_a + dt_bias); beta = sigmoid(x W_b);
    gamma = sigmoid(x W_c); o = op(...); y = RMSNorm(o) * SiLU(x W_gate), then W_o.
    """

    def __init__(self, config: LinAttnConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.mode = config.layer_types[layer_idx]
        self.clip = config.residual_clip
        self.num_heads, self.num_kv_heads = config.linear_num_heads, config.linear_num_key_value_heads
        self.key_dim, self.value_dim = config.linear_key_head_dim, config.linear_value_head_dim
        self.use_rotary = config.linear_use_rotary
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.key_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.key_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.value_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.value_dim, hidden, bias=config.attention_output_bias)
        self.conv_channels = (self.num_heads + self.num_kv_heads) * self.key_dim + self.num_kv_heads * self.value_dim
        self.conv_size = config.linear_conv_size
        self.conv1d = nn.Conv1d(
            self.conv_channels, self.conv_channels, self.conv_size, groups=self.conv_channels, bias=False
        )
        if config.qk_norm:
            self.q_norm = LinAttnRMSNorm(self.key_dim, config.rms_norm_eps)
            self.k_norm = LinAttnRMSNorm(self.key_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.a_proj = nn.Linear(hidden, self.num_heads, bias=False)
        self.b_proj = nn.Linear(hidden, self.num_heads, bias=False)
        self.c_proj = nn.Linear(hidden, self.num_heads, bias=False) if self.mode in ("rla", "rdn") else None
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.dt_bias = nn.Parameter(torch.zeros(self.num_heads))
        gate = config.linear_output_gate
        self.g_proj = nn.Linear(hidden, self.num_heads * self.value_dim, bias=False) if gate else None
        self.o_norm = LinAttnRMSNorm(self.value_dim, config.rms_norm_eps) if config.linear_output_norm else None

    def _short_conv(self, x: torch.Tensor, cache: LinAttnCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise conv of x [B, T, C], continuing from the cached last inputs.

        Returns the output [B, T, C] and the conv's input window [B, C, conv_size - 1 + T] (for rollback logs).
        """
        B, _, C = x.shape
        x = x.transpose(1, 2)
        past = cache.conv_states[self.layer_idx] if cache is not None else None
        if past is None:
            past = x.new_zeros(B, C, self.conv_size - 1)
        x = torch.cat([past.to(x.dtype), x], dim=-1)
        if cache is not None:
            cache.conv_states[self.layer_idx] = x[:, :, x.shape[-1] - (self.conv_size - 1) :]
        return self.conv1d(x).transpose(1, 2), x

    def _op(self, q, k, v, g, beta, gamma, state, output_final_state: bool):
        """The residual_attention op on [B, T, H, *] inputs; the token loop for short blocks on CPU."""
        backend = "recurrent" if q.shape[1] <= RECURRENT_DECODE_MAX_TOKENS and not q.is_cuda else "auto"
        return residual_attention(
            q, k, v, g, beta, gamma,
            mode=self.mode, clip=self.clip, initial_state=state, output_final_state=output_final_state, backend=backend,
        )  # fmt: skip

    def _op_with_log(self, q, k, v, g, beta, gamma, state, cache: LinAttnCache, conv_inputs: torch.Tensor):
        """The op, also logging the state after each of the last ``cache.max_rollback`` positions into ``cache``."""
        T = q.shape[1]
        head = max(0, T - cache.max_rollback)

        def part(t, a, b):
            return None if t is None else t[:, a:b]

        outputs = []
        if head:
            o, state = self._op(q[:, :head], k[:, :head], v[:, :head], g[:, :head], beta[:, :head],
                                part(gamma, 0, head), state, True)  # fmt: skip
            outputs.append(o)
        before, states = state, []
        # the reference recurrence directly (inputs are the layer's own), collecting the state after each token
        o, state = recurrent_residual_attention(
            q[:, head:], k[:, head:], v[:, head:], g[:, head:], beta[:, head:], part(gamma, head, T), self.mode,
            self.clip, q.shape[-1] ** -0.5, state if state is not None else (None, None), True, step_states=states,
        )  # fmt: skip
        outputs.append(o)
        cache.log_linear(self.layer_idx, before, states, conv_inputs)
        return torch.cat(outputs, dim=1), state

    def _heads(self, x: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
        """[B, T, heads * dim] -> [B, T, num_heads, dim], sharing kv heads across their query group."""
        x = x.unflatten(-1, (heads, dim))
        return x.repeat_interleave(self.num_heads // heads, dim=2) if heads != self.num_heads else x

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: LinAttnCache | None,
        past_length: int,
    ) -> torch.Tensor:
        """hidden_states [B, T, D] -> [B, T, D]. Padded positions (mask 0) write nothing into the states."""
        B, T, _ = hidden_states.shape
        x = hidden_states
        valid = attention_mask[:, -T:].to(x.dtype)[..., None] if attention_mask is not None else None
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        if valid is not None:
            qkv = qkv * valid  # padded tokens enter the conv (and its cached state) as zeros
        conv_out, conv_inputs = self._short_conv(qkv, cache)
        qkv = F.silu(conv_out)
        q, k, v = qkv.split(
            [self.num_heads * self.key_dim, self.num_kv_heads * self.key_dim, self.num_kv_heads * self.value_dim], -1
        )
        q = q.unflatten(-1, (self.num_heads, self.key_dim))
        k = self._heads(k, self.num_kv_heads, self.key_dim)
        v = self._heads(v, self.num_kv_heads, self.value_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = F.normalize(q.float(), dim=-1).to(q.dtype), F.normalize(k.float(), dim=-1).to(k.dtype)
        if self.use_rotary:
            cos, sin = position_embeddings
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        wide = torch.promote_types(x.dtype, torch.float32)  # gates in fp32 at least (fp64 stays fp64)
        g = -self.A_log.to(wide).exp() * F.softplus(self.a_proj(x).to(wide) + self.dt_bias)
        beta = torch.sigmoid(self.b_proj(x).to(wide))
        gamma = torch.sigmoid(self.c_proj(x).to(wide)) if self.c_proj is not None else None
        if valid is not None:
            # a padded token neither decays (g = 0) nor writes (beta = gamma = 0) the states
            keep = valid.to(wide)  # [B, T, 1], broadcasts over heads
            g, beta = g * keep, beta * keep
            gamma = gamma * keep if gamma is not None else None

        state = cache.recurrent_states[self.layer_idx] if cache is not None else None
        if cache is not None and cache.record_past:
            o, final = self._op_with_log(q, k, v, g, beta, gamma, state, cache, conv_inputs)
        else:
            o, final = self._op(q, k, v, g, beta, gamma, state, cache is not None)
        if cache is not None:
            cache.recurrent_states[self.layer_idx] = final
        if self.o_norm is not None:
            o = self.o_norm(o)
        if self.g_proj is not None:
            o = o * F.silu(self.g_proj(x)).unflatten(-1, (self.num_heads, self.value_dim))
        return self.o_proj(o.reshape(B, T, -1).to(x.dtype))


__all__ = [
    "LinAttnLinearAttention",
    "LinAttnMLP",
    "LinAttnRMSNorm",
    "LinAttnRotaryEmbedding",
    "LinAttnSoftmaxAttention",
]
