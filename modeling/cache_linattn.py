"""The one cache of hf_linattn models: recurrent + conv state for linear layers, keys/values for softmax layers.

Per layer it holds
- linear layers ("gla", "gdn", "rla", "rdn"): the states (S, R), each [B, H, K, V] in fp32
  (R is None for gla/gdn), and the conv state [B, C, conv_size - 1] (the last inputs of the
  causal depthwise conv);
- softmax layers: keys and values [B, H_kv, L, D]; sliding layers keep only the last
  `sliding_window` positions, so their memory does not grow with the context.

The cache is batch-major everywhere, so beam-search reordering and batch selection are one
`index_select` per tensor.
"""

from __future__ import annotations

import torch

from .configuration_linattn import LINEAR_LAYER_TYPES, LinAttnConfig


class LinAttnCache:
    """Generation cache for [`LinAttnForCausalLM`]; created empty and filled by the first forward."""

    is_compileable = False

    def __init__(self, config: LinAttnConfig):
        self.layer_types = list(config.layer_types)
        self.sliding_window = config.sliding_window
        n = len(self.layer_types)
        self.recurrent_states: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * n
        self.conv_states: list[torch.Tensor | None] = [None] * n
        self.keys: list[torch.Tensor | None] = [None] * n
        self.values: list[torch.Tensor | None] = [None] * n
        self._seen_tokens = 0

    # ---- queries used by generate() and the model ----
    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Number of tokens processed so far (padding included, as in transformers' caches)."""
        return self._seen_tokens

    def __len__(self) -> int:
        return len(self.layer_types)

    def is_linear(self, layer_idx: int) -> bool:
        return self.layer_types[layer_idx] in LINEAR_LAYER_TYPES

    # ---- updates, called by the layers ----
    def advance(self, num_tokens: int) -> None:
        """Mark `num_tokens` new positions as processed; the model calls it once per forward."""
        self._seen_tokens += num_tokens

    def update_kv(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Append keys/values [B, H_kv, T, D]; return all keys, values and the absolute position of the first.

        Sliding layers store only the last `sliding_window` positions after the update.
        """
        past_k, past_v = self.keys[layer_idx], self.values[layer_idx]
        first_position = self._seen_tokens
        if past_k is not None:
            first_position -= past_k.shape[2]
            keys, values = torch.cat([past_k, keys], dim=2), torch.cat([past_v, values], dim=2)
        stored_k, stored_v = keys, values
        if self.layer_types[layer_idx] == "sliding_attention" and keys.shape[2] > self.sliding_window:
            stored_k, stored_v = keys[:, :, -self.sliding_window :], values[:, :, -self.sliding_window :]
        self.keys[layer_idx], self.values[layer_idx] = stored_k, stored_v
        return keys, values, first_position

    # ---- batch manipulation used by beam search and batch-selecting strategies ----
    def _apply(self, fn) -> None:
        for i in range(len(self.layer_types)):
            if self.recurrent_states[i] is not None:
                S, R = self.recurrent_states[i]
                self.recurrent_states[i] = (fn(S), fn(R) if R is not None else None)
            for store in (self.conv_states, self.keys, self.values):
                if store[i] is not None:
                    store[i] = fn(store[i])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder every batch row by `beam_idx` (beam search)."""
        self._apply(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows in `indices`."""
        self._apply(lambda x: x[indices.to(x.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row `repeats` times (expanding a prompt to beams or samples)."""
        self._apply(lambda x: x.repeat_interleave(repeats, dim=0))

    def nbytes(self) -> int:
        """Bytes held by all cached tensors."""
        total = 0
        for i in range(len(self.layer_types)):
            tensors = [self.conv_states[i], self.keys[i], self.values[i]]
            if self.recurrent_states[i] is not None:
                tensors += list(self.recurrent_states[i])
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return total


__all__ = ["LinAttnCache"]
