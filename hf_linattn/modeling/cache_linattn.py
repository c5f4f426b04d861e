"""The cache of hf_linattn models: a `transformers.Cache` whose layers match the model's mixers.

- full-attention layers use transformers' `DynamicLayer`; sliding layers `LinAttnSlidingLayer`
  (transformers' `DynamicSlidingWindowLayer`, which keeps `sliding_window - 1` keys, with a longer
  rollback reach);
- linear layers ("gla", "gdn", "rla", "rdn") use `LinAttnLinearLayer`: the recurrent states (S, R),
  each [B, H, K, V] in fp32 (R is None for gla/gdn), and the conv window [B, C, conv_size - 1]
  (the last inputs of the causal depthwise conv). The model's linear layers read it with
  `linear_state()` and write it with `update_linear()`.
The static-shape cache for compiled decoding is in ``static_cache_linattn.py``.

Rollback (speculative decoding, prompt lookup, lookahead): after `activate_past_recording()`, every
forward of a linear layer also hands the cache the `BlockRecord` of its tokens (keys, decays and
what each token wrote: O(tokens x (K + V)) per head, not one K x V state per token), and the
records of consecutive forwards concatenate. `crop(-n)` rebuilds exactly the state after all but
the last n recorded tokens. Any number of tokens since the last crop can be undone, and at least
`rollback_horizon` tokens before it (universal assisted decoding re-tokenizes and may undo a few
tokens it had accepted). transformers' generate() reads `is_linear`, `is_croppable` and
`is_compileable` from the layers, as for its own caches.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionCacheLayerMixin

from hf_linattn.kernels.block import BlockRecord

from .configuration_linattn import LINEAR_LAYER_TYPES, LinAttnConfig

State = tuple[torch.Tensor, torch.Tensor | None]
ROLLBACK_HORIZON = 128  # tokens before the last crop that a later crop may still undo


class LinAttnLinearLayer(LinearAttentionCacheLayerMixin):
    """Cache of one linear-attention layer: recurrent states, conv window, and the rollback record."""

    is_sliding = False

    def __init__(self, conv_size: int, rollback_horizon: int = ROLLBACK_HORIZON):
        super().__init__(number_of_states=1)
        self.conv_width = conv_size - 1
        self.rollback_horizon = rollback_horizon
        self.state: State | None = None
        self.conv: torch.Tensor | None = None
        self.cumulative_length = 0
        # While recording: the record of the tokens since the last crop, and their conv inputs [B, C, width + n]
        # (the conv window before them, then theirs). Before it, the tokens kept for rollbacks past the last crop:
        # one record holding the oldest kept state, then the later accepted blocks without a state of their own
        # (each continues the one before), merged only when needed.
        self.record: BlockRecord | None = None
        self.conv_inputs: torch.Tensor | None = None
        self.history: list[tuple[BlockRecord, torch.Tensor]] = []

    # ---- transformers' cache-layer protocol ----
    @property
    def is_croppable(self) -> bool:
        return True  # `crop` rebuilds the states exactly from the records

    @property
    def is_compileable(self) -> bool:
        return False  # states are replaced, not copied in place (the static cache has its own layer)

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def lazy_initialization(self, *args, **kwargs) -> None:
        """Nothing to allocate ahead: the first forward sets the states."""

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        raise NotImplementedError("hf_linattn layers update their cache with LinAttnCache.update_linear")

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        raise NotImplementedError("hf_linattn layers update their cache with LinAttnCache.update_linear")

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None) -> None:
        """Start recording. transformers >= 5.25 passes how many past states to keep; the record keeps the
        per-position states of every token since the last crop, so the count is kept only for its queries."""
        self.record_past = True
        self.recurrent_states_to_keep = recurrent_states_to_keep

    def update(self, *, state: State, conv_inputs: torch.Tensor, record: BlockRecord | None, num_tokens: int) -> None:
        """Store a forward: its final state, its conv inputs [B, C, width + T] and, while recording, its record."""
        self.state = state
        self.conv = conv_inputs[:, :, conv_inputs.shape[-1] - self.conv_width :]
        self.cumulative_length += num_tokens
        if not self.record_past:
            return
        if record is None or len(record) != num_tokens:
            raise ValueError("a recording cache needs the BlockRecord of every token of the forward")
        if self.record is None:
            self.record, self.conv_inputs = record, conv_inputs
        else:
            self.record = self.record.extend(record)
            self.conv_inputs = torch.cat([self.conv_inputs, conv_inputs[:, :, self.conv_width :]], dim=-1)

    def max_rollback(self) -> int:
        """Tokens a crop can undo: those since the last crop and those kept before it."""
        return self.recorded_tokens() if self.record_past else 0

    def recorded_tokens(self) -> int:
        """Tokens recorded: those since the last crop and those kept before it."""
        return (0 if self.record is None else len(self.record)) + sum(len(r) for r, _ in self.history)

    def _merged_history(self) -> tuple[BlockRecord, torch.Tensor]:
        """The kept tokens before the last crop as one record (one concatenation, done when a crop needs it)."""
        if len(self.history) > 1:
            records, convs = zip(*self.history)
            conv = torch.cat([convs[0], *(c[:, :, self.conv_width :] for c in convs[1:])], dim=-1)
            self.history = [(records[0].extend(*records[1:]), conv)]
        return self.history[0]

    def crop(self, tokens_to_remove: int) -> None:
        """Undo the last ``-tokens_to_remove`` tokens (<= 0) exactly; ``crop(0)`` only closes the current block.

        Cost: one state rebuilt from the current block's record; a crop past the previous crop point rebuilds it
        from the kept history instead.
        """
        remove = -tokens_to_remove
        if remove and not self.record_past:
            raise RuntimeError("crop needs activate_past_recording() before the tokens to undo were processed")
        current = 0 if self.record is None else len(self.record)
        if remove > self.recorded_tokens():
            raise RuntimeError(
                f"cannot roll back {remove} tokens: {self.recorded_tokens()} are recorded (every token since the "
                f"last crop, and up to rollback_horizon={self.rollback_horizon} before it)"
            )
        if remove <= current:
            keep = current - remove
            if remove:
                self.state = self.record.state_after(keep)
                self.conv = self.conv_inputs[:, :, keep : keep + self.conv_width]
            if keep:  # the accepted tokens join the history
                accepted = self.record.truncate(keep)
                self.history.append((accepted if not self.history else accepted.without_state(),
                                     self.conv_inputs[:, :, : keep + self.conv_width]))  # fmt: skip
        else:  # past the last crop point (universal assisted decoding re-tokenizes the end of the text)
            history, conv = self._merged_history()
            keep = len(history) - (remove - current)
            self.state = history.state_after(keep)
            self.conv = conv[:, :, keep : keep + self.conv_width]
            self.history = [(history.truncate(keep), conv[:, :, : keep + self.conv_width])] if keep else []
        self.cumulative_length -= remove
        self.record, self.conv_inputs = None, None
        # keep about rollback_horizon tokens; trimming (which builds a state) waits until twice that: amortized
        kept = sum(len(r) for r, _ in self.history)
        if kept > 2 * self.rollback_horizon:
            history, conv = self._merged_history()
            drop = kept - self.rollback_horizon
            self.history = [(history.drop_front(drop), conv[:, :, drop:])]

    def _select_rows(self, indices: torch.Tensor) -> None:
        """Keep (and reorder, or repeat) batch rows: every tensor held becomes ``tensor[indices]``."""
        if self.state is not None:
            S, R = self.state
            indices = indices.to(S.device)
            self.state = (S[indices], None if R is None else R[indices])
        if self.conv is not None:
            self.conv = self.conv[indices.to(self.conv.device)]
        if self.record is not None:
            self.record = self.record.select(indices)
            self.conv_inputs = self.conv_inputs[indices.to(self.conv_inputs.device)]
        self.history = [(r.select(indices), c[indices.to(c.device)]) for r, c in self.history]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.conv is not None:
            batch = self.conv.shape[0]
            self._select_rows(torch.arange(batch, device=self.conv.device).repeat_interleave(repeats))

    def reset(self) -> None:
        self.state, self.conv, self.cumulative_length = None, None, 0
        self.record, self.conv_inputs, self.history = None, None, []

    def offload(self) -> None:
        """Linear layers are small and stay on their device (transformers never offloads linear layers)."""

    def prefetch(self) -> None:
        """See `offload`."""

    def nbytes(self) -> int:
        tensors = [self.conv, *(self.state or ())]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def recording_nbytes(self) -> int:
        blocks = self.history + ([(self.record, self.conv_inputs)] if self.record is not None else [])
        return sum(r.nbytes() + c.numel() * c.element_size() for r, c in blocks)


class LinAttnSlidingLayer(DynamicSlidingWindowLayer):
    """transformers' sliding-window layer, whose crop keeps ``rollback_horizon`` keys more than the window, so
    that a later crop may undo tokens from before the last one (as the linear layers can)."""

    def __init__(self, sliding_window: int, rollback_horizon: int = ROLLBACK_HORIZON):
        super().__init__(sliding_window=sliding_window)
        self.rollback_horizon = rollback_horizon

    def max_rollback(self) -> int:
        """Tokens a crop can undo: the next forward needs the window - 1 keys before the new end."""
        if not self.is_initialized:
            return 0
        held = self.keys.shape[-2]
        return held if held == self.cumulative_length else max(0, held - (self.sliding_window - 1))

    def crop(self, tokens_to_remove: int) -> None:
        remove = -tokens_to_remove
        if tokens_to_remove > 0 or not self.is_initialized:
            return super().crop(tokens_to_remove)
        if remove > self.max_rollback():
            raise RuntimeError(f"cannot roll back {remove} tokens: the sliding layer can undo {self.max_rollback()}")
        held = self.keys.shape[-2]
        keep = self.sliding_window - 1 + self.rollback_horizon
        self.keys = self.keys[:, :, : held - remove][:, :, -keep:]
        self.values = self.values[:, :, : held - remove][:, :, -keep:]
        self.cumulative_length -= remove


class _LinAttnCacheBase(Cache):
    """What the model's layers and generate() use of both caches: the linear-layer accessors and the queries."""

    def linear_state(self, layer_idx: int) -> tuple[State | None, torch.Tensor | None]:
        """((S, R) or None, conv window [B, C, conv_size - 1] or None) of a linear layer."""
        layer = self.layers[layer_idx]
        return layer.state, layer.conv

    def update_linear(
        self, layer_idx: int, *, state: State, conv_inputs: torch.Tensor, record: BlockRecord | None, num_tokens: int
    ) -> None:
        """Store a linear layer's forward: final state, conv inputs [B, C, width + T], record while recording."""
        self.layers[layer_idx].update(state=state, conv_inputs=conv_inputs, record=record, num_tokens=num_tokens)

    def is_recording(self, layer_idx: int) -> bool:
        return bool(getattr(self.layers[layer_idx], "record_past", False))

    def get_seq_length(self, layer_idx: int = 0):
        """Tokens processed so far (padding included), from any layer: every layer kind tracks it."""
        return self.layers[layer_idx].get_seq_length()

    def nbytes(self) -> int:
        """Bytes held by the cached states and keys/values (the rollback record excluded)."""
        total = 0
        for layer in self.layers:
            if hasattr(layer, "recording_nbytes"):
                total += layer.nbytes()
            elif getattr(layer, "keys", None) is not None and layer.keys.numel():
                total += layer.keys.numel() * layer.keys.element_size() * 2
        return total

    def recording_nbytes(self) -> int:
        """Bytes held by the rollback records of the linear layers (keys, decays, writes, entering states, conv)."""
        return sum(layer.recording_nbytes() for layer in self.layers if hasattr(layer, "recording_nbytes"))


class LinAttnCache(_LinAttnCacheBase):
    """Generation cache of [`LinAttnForCausalLM`], one layer per model layer; created empty, filled by forwards."""

    def __init__(self, config: LinAttnConfig, rollback_horizon: int = ROLLBACK_HORIZON):
        layers = []
        for mixer in config.mixer_types:
            if mixer in LINEAR_LAYER_TYPES:
                layers.append(LinAttnLinearLayer(config.linear_conv_size, rollback_horizon=rollback_horizon))
            elif mixer == "sliding_attention":
                layers.append(LinAttnSlidingLayer(config.sliding_window, rollback_horizon=rollback_horizon))
            else:
                layers.append(DynamicLayer())
        super().__init__(layers=layers)
        self.rollback_horizon = rollback_horizon

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(super().get_seq_length(layer_idx))

    def crop(self, max_length: int) -> None:
        """Undo tokens: ``crop(-n)`` removes the last n (exact for every layer kind); ``crop(L)``, L > 0, keeps
        the first L. ``crop(0)`` only trims the rollback records."""
        remove = -max_length if max_length <= 0 else self.get_seq_length() - max_length
        if remove < 0:
            raise ValueError(f"cannot crop to {max_length} tokens: the cache holds {self.get_seq_length()}")
        if remove and not all(getattr(layer, "record_past", True) for layer in self.layers):
            raise RuntimeError("crop needs activate_past_recording() before the tokens to undo were processed")
        limit = min(layer.max_rollback() if hasattr(layer, "max_rollback") else remove for layer in self.layers)
        if remove > limit:  # checked before any layer changes, so a refused crop leaves the cache as it was
            raise RuntimeError(
                f"cannot roll back {remove} tokens: this cache can undo {limit} (every token since the last crop, "
                f"and at least rollback_horizon={self.rollback_horizon} before it)"
            )
        for layer in self.layers:
            layer.crop(-remove)


__all__ = ["ROLLBACK_HORIZON", "LinAttnCache", "LinAttnLinearLayer", "LinAttnSlidingLayer", "State"]
