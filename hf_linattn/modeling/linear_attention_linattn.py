"""The linear-attention mixer of hf_linattn models: one of gla / gdn / rla / rdn per layer.

The layer around the op follows Gated DeltaNet (spec: "The layer around the op"). It reads its
cache with ``LinAttnCache.linear_state`` and writes it with ``LinAttnCache.update_linear``.
Packed batches (several sequences in one row, position ids restarting at 0) reset the states at
every sequence start: the conv taps do not cross a start, and g = -inf there (alpha = 0) makes
both recurrent states forget exactly what came before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hf_linattn.kernels.block import BLOCK_CHUNK, BlockRecord
from hf_linattn.kernels.modes import is_residual
from hf_linattn.kernels.ops import dispatch_block_residual_attention, dispatch_decode_step, dispatch_residual_attention

from .cache_linattn import LinAttnCache
from .configuration_linattn import LinAttnConfig
from .layers_linattn import LinAttnRMSNorm, apply_rotary


def packed_sequence_starts(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Where a new sequence starts in packed rows (position ids not counting up by one), [B, T] bool.

    None when every row is one sequence (the common case). One host sync: call it once per forward.
    """
    if position_ids.shape[-1] < 2:
        return None
    jumps = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not bool(jumps.any()):
        return None
    return torch.cat([torch.ones_like(jumps[:, :1]), jumps], dim=1)


class LinAttnLinearAttention(nn.Module):
    """Gated (residual) linear attention mixer, one of gla / gdn / rla / rdn (spec: "The layer around the op").

    q, k, v = SiLU(ShortConv(x W))  ->  L2Norm(q), L2Norm(k) per head (after optional Qwen3 q/k RMSNorm
    and optional rotary); g = -exp(A_log) softplus(x W_a + dt_bias); beta = sigmoid(x W_b);
    gamma = sigmoid(x W_c); o = op(...); y = RMSNorm(o) * SiLU(x W_gate), then W_o.
    """

    def __init__(self, config: LinAttnConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.mode = config.mixer_types[layer_idx]
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
        self.c_proj = nn.Linear(hidden, self.num_heads, bias=False) if is_residual(self.mode) else None
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.dt_bias = nn.Parameter(torch.zeros(self.num_heads))
        gate = config.linear_output_gate
        self.g_proj = nn.Linear(hidden, self.num_heads * self.value_dim, bias=False) if gate else None
        self.o_norm = LinAttnRMSNorm(self.value_dim, config.rms_norm_eps) if config.linear_output_norm else None

    def _short_conv(
        self, x: torch.Tensor, past: torch.Tensor | None, sequence_starts: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise conv of x [B, T, C], continuing from the cached last inputs ``past`` [B, C, width].

        Returns the output [B, T, C] and the conv's input window [B, C, width + T] (what the cache keeps).
        With ``sequence_starts`` (packed rows), taps that would reach into an earlier sequence read zeros.
        """
        B, T, C = x.shape
        width = self.conv_size - 1
        x = x.transpose(1, 2)
        if past is None:
            past = x.new_zeros(B, C, width)
        window = torch.cat([past.to(x.dtype), x], dim=-1)
        if sequence_starts is None and T > BLOCK_CHUNK:
            return self.conv1d(window).transpose(1, 2), window
        if sequence_starts is None and T == 1:  # a decode step: one multiply and one sum over the taps
            return (window * self.conv1d.weight[:, 0]).sum(-1)[:, None], window
        # short blocks (verify steps): a few multiply-adds beat the convolution's setup cost
        weight = self.conv1d.weight[:, 0, :, None]  # [C, conv_size, 1], tap conv_size - 1 is the current token
        segment = None
        if sequence_starts is not None:  # packed rows: a tap that reaches into an earlier sequence reads zero
            segment = F.pad(sequence_starts.long().cumsum(-1), (width, 0), value=-1)[:, None, :]  # [B, 1, width + T]
        out = window[:, :, width:] * weight[:, width]
        for lag in range(1, self.conv_size):
            tap = window[:, :, width - lag : width - lag + T] * weight[:, width - lag]
            if segment is not None:
                tap = tap * (segment[..., width - lag : width - lag + T] == segment[..., width:])
            out = out + tap
        return out.transpose(1, 2), window

    def _op(self, q, k, v, g, beta, gamma, state, record: bool) -> tuple[torch.Tensor, tuple, BlockRecord | None]:
        """The op on [B, T, H, *] inputs from the cached ``state``: o, the final state and (if ``record``) the
        block's record for rollback. Three exact paths: one token (a decode step: a few fused ops with fixed
        shapes, for torch.compile), a block of at most one chunk (a verify forward: one parallel pass that also
        gives the record), and long sequences (the chunked path). On CUDA each takes its Triton kernel when it
        imports (ops.py decides: block decode and the fused step need no autograd)."""
        T, scale = q.shape[1], q.shape[-1] ** -0.5
        state = state if state is not None else (None, None)
        if T == 1 and not record:
            o, final = dispatch_decode_step(
                q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], None if gamma is None else gamma[:, 0],
                mode=self.mode, clip=self.clip, scale=scale, state=state,
            )  # fmt: skip
            return o[:, None], final, None
        if T <= BLOCK_CHUNK or record:
            return dispatch_block_residual_attention(
                q, k, v, g, beta, gamma, mode=self.mode, clip=self.clip, scale=scale, initial_state=state,
                record=record,
            )  # fmt: skip
        o, final = dispatch_residual_attention(
            q, k, v, g, beta, gamma, mode=self.mode, clip=self.clip, scale=scale, initial_state=state,
            output_final_state=True, backend="auto",
        )  # fmt: skip
        return o, final, None

    def _heads(self, x: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
        """[B, T, heads * dim] -> [B, T, num_heads, dim], sharing kv heads across their query group."""
        x = x.unflatten(-1, (heads, dim))
        return x.repeat_interleave(self.num_heads // heads, dim=2) if heads != self.num_heads else x

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: LinAttnCache | None = None,
        sequence_starts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        """hidden_states [B, T, D] -> [B, T, D] (and None: no attention weights).

        attention_mask: the 2D padding mask [B, T] of this forward's tokens (0 = padding), or None.
        Padded positions write nothing into the states. sequence_starts [B, T] bool: packed rows.
        """
        B, T, _ = hidden_states.shape
        x = hidden_states
        valid = attention_mask.to(x.dtype)[..., None] if attention_mask is not None else None
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        if valid is not None:
            qkv = qkv * valid  # padded tokens enter the conv (and its cached window) as zeros
        state, conv_past = cache.linear_state(self.layer_idx) if cache is not None else (None, None)
        conv_out, conv_inputs = self._short_conv(qkv, conv_past, sequence_starts)
        qkv = F.silu(conv_out)
        q, k, v = qkv.split(
            [self.num_heads * self.key_dim, self.num_kv_heads * self.key_dim, self.num_kv_heads * self.value_dim], -1
        )
        q = q.unflatten(-1, (self.num_heads, self.key_dim))
        k = self._heads(k, self.num_kv_heads, self.key_dim)
        v = self._heads(v, self.num_kv_heads, self.value_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        wide = torch.promote_types(x.dtype, torch.float32)  # norms and gates in fp32 at least (fp64 stays fp64)
        q, k = F.normalize(q.to(wide), dim=-1).to(q.dtype), F.normalize(k.to(wide), dim=-1).to(k.dtype)
        if self.use_rotary:
            cos, sin = position_embeddings
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        g = -self.A_log.to(wide).exp() * F.softplus(self.a_proj(x).to(wide) + self.dt_bias)
        beta = torch.sigmoid(self.b_proj(x).to(wide))
        gamma = torch.sigmoid(self.c_proj(x).to(wide)) if self.c_proj is not None else None
        if valid is not None:
            # a padded token neither decays (g = 0) nor writes (beta = gamma = 0) the states
            keep = valid.to(wide)  # [B, T, 1], broadcasts over heads
            g, beta = g * keep, beta * keep
            gamma = gamma * keep if gamma is not None else None
        if sequence_starts is not None:
            # alpha = exp(-inf) = 0 at a sequence start: both states forget the previous sequence exactly
            g = g.masked_fill(sequence_starts[..., None], float("-inf"))

        recording = cache is not None and cache.is_recording(self.layer_idx)
        o, final, record = self._op(q, k, v, g, beta, gamma, state, record=recording)
        if cache is not None:
            cache.update_linear(self.layer_idx, state=final, conv_inputs=conv_inputs, record=record, num_tokens=T)
        if self.o_norm is not None:
            o = self.o_norm(o)
        if self.g_proj is not None:
            o = o * F.silu(self.g_proj(x)).unflatten(-1, (self.num_heads, self.value_dim))
        return self.o_proj(o.reshape(B, T, -1).to(x.dtype)), None


__all__ = ["LinAttnLinearAttention", "packed_sequence_starts"]
