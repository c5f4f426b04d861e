"""The one cache of hf_linattn models: recurrent + conv state for linear layers, keys/values for softmax layers.

Per layer it holds
- linear layers ("gla", "gdn", "rla", "rdn"): the states (S, R), each [B, H, K, V] in fp32
  (R is None for gla/gdn), and the conv state [B, C, conv_size - 1] (the last inputs of the
  causal depthwise conv);
- softmax layers: keys and values [B, H_kv, L, D]; sliding layers keep only the last
  `sliding_window` positions, so their memory does not grow with the context.

The cache is batch-major everywhere, so beam-search reordering and batch selection are one
`index_select` per tensor.

Rollback (speculative decoding, prompt lookup, lookahead): after `activate_past_recording()`,
every forward also logs, per linear layer, the state after each of its positions and the conv
inputs, and softmax layers keep keys beyond the sliding window. `crop(-n)` then restores exactly
the state after all but the last n tokens since the previous crop, and starts a new log. The log
keeps at most `max_rollback` positions: its memory per linear layer is (positions + 1) x the
state size (S, plus R in residual modes), reported by `recording_nbytes()`.
"""

from __future__ import annotations

import torch

from .configuration_linattn import LINEAR_LAYER_TYPES, LinAttnConfig


class LinAttnCache:
    """Generation cache for [`LinAttnForCausalLM`]; created empty and filled by the first forward."""

    is_compileable = False

    def __init__(self, config: LinAttnConfig, max_rollback: int = 64):
        self.layer_types = list(config.layer_types)
        self.sliding_window = config.sliding_window
        n = len(self.layer_types)
        self.recurrent_states: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * n
        self.conv_states: list[torch.Tensor | None] = [None] * n
        self.keys: list[torch.Tensor | None] = [None] * n
        self.values: list[torch.Tensor | None] = [None] * n
        self._seen_tokens = 0
        self.record_past = False
        self.max_rollback = max_rollback
        # per linear layer: [state before the first logged position, state after each logged position]
        self._state_log: list[list[tuple[torch.Tensor, torch.Tensor | None] | None]] = [[] for _ in range(n)]
        # per linear layer: conv inputs [B, C, conv_size - 1 + logged positions]
        self._conv_log: list[torch.Tensor | None] = [None] * n
        self._logged = 0

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
        if self.record_past:
            self._logged = min(self._logged + num_tokens, self.max_rollback)

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
        if self.layer_types[layer_idx] == "sliding_attention":
            # while recording, a sliding layer also keeps the positions a rollback may need back
            keep = self.sliding_window + (self.max_rollback if self.record_past else 0)
            stored_k, stored_v = keys[:, :, -keep:], values[:, :, -keep:]
        self.keys[layer_idx], self.values[layer_idx] = stored_k, stored_v
        return keys, values, first_position

    # ---- rollback ----
    def activate_past_recording(self) -> None:
        """Log per-position states from now on, so that `crop(-n)` can undo the last n tokens."""
        self.record_past = True
        self._restart_log()

    def log_linear(
        self,
        layer_idx: int,
        before: tuple[torch.Tensor, torch.Tensor | None] | None,
        states: list[tuple[torch.Tensor, torch.Tensor | None]],
        conv_inputs: torch.Tensor,
    ) -> None:
        """Record a linear layer's forward: the state before it, the state after each position, its conv inputs.

        conv_inputs [B, C, conv_size - 1 + T]: the cached conv state followed by this forward's inputs.
        """
        log = self._state_log[layer_idx]
        if not log:
            log.append(before)
        log.extend(states)
        del log[: max(0, len(log) - self.max_rollback - 1)]
        width = self.conv_states[layer_idx].shape[-1]  # conv_size - 1, the part already logged
        past = self._conv_log[layer_idx]
        conv = conv_inputs if past is None else torch.cat([past, conv_inputs[:, :, width:]], -1)
        self._conv_log[layer_idx] = conv[:, :, -(width + self.max_rollback) :]

    def crop(self, max_length: int) -> None:
        """Undo tokens: ``crop(-n)`` removes the last n; ``crop(L)`` with L >= 0 keeps the first L.

        Exact for every layer type: recurrent and conv states come back from the log, keys and values
        are cut. ``crop(0)`` only trims the log. Raises if more tokens are removed than were logged.
        """
        remove = -max_length if max_length <= 0 else self._seen_tokens - max_length
        if remove < 0:
            raise ValueError(f"cannot crop to {max_length} tokens: the cache holds {self._seen_tokens}")
        if remove and not self.record_past:
            raise RuntimeError("crop needs activate_past_recording() before the tokens to undo were processed")
        if remove > self._logged:
            raise RuntimeError(
                f"cannot roll back {remove} tokens: only the last {self._logged} were logged "
                f"(max_rollback={self.max_rollback})"
            )
        for i in range(len(self.layer_types)):
            if self.is_linear(i):
                log = self._state_log[i]
                if log:
                    self.recurrent_states[i] = log[len(log) - 1 - remove]
                if self._conv_log[i] is not None:
                    conv = self._conv_log[i]
                    width = self.conv_states[i].shape[-1]
                    self.conv_states[i] = conv[:, :, : conv.shape[-1] - remove][:, :, -width:]
            elif self.keys[i] is not None:
                keep = self.keys[i].shape[2] - remove
                self.keys[i], self.values[i] = self.keys[i][:, :, :keep], self.values[i][:, :, :keep]
                if self.layer_types[i] == "sliding_attention":
                    self.keys[i] = self.keys[i][:, :, -self.sliding_window :]
                    self.values[i] = self.values[i][:, :, -self.sliding_window :]
        self._seen_tokens -= remove
        self._restart_log()

    def recording_nbytes(self) -> int:
        """Bytes held by the rollback log (per-position states and conv inputs)."""
        total = 0
        for i in range(len(self.layer_types)):
            for entry in self._state_log[i]:
                if entry is not None:
                    total += sum(t.numel() * t.element_size() for t in entry if t is not None)
            if self._conv_log[i] is not None:
                total += self._conv_log[i].numel() * self._conv_log[i].element_size()
        return total

    def _restart_log(self) -> None:
        n = len(self.layer_types)
        self._state_log = [[] for _ in range(n)]
        self._conv_log = [None] * n
        self._logged = 0

    # ---- batch manipulation used by beam search and batch-selecting strategies ----
    def _apply(self, fn) -> None:
        for i in range(len(self.layer_types)):
            if self.recurrent_states[i] is not None:
                S, R = self.recurrent_states[i]
                self.recurrent_states[i] = (fn(S), fn(R) if R is not None else None)
            for store in (self.conv_states, self.keys, self.values, self._conv_log):
                if store[i] is not None:
                    store[i] = fn(store[i])
            self._state_log[i] = [
                None if e is None else (fn(e[0]), fn(e[1]) if e[1] is not None else None) for e in self._state_log[i]
            ]

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
