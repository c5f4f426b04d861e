"""The cache of hf_linattn models: a `transformers.Cache` whose layers match the model's mixers.

- softmax layers use transformers' own layers: `DynamicLayer` (full attention) and
  `DynamicSlidingWindowLayer` (sliding attention, which keeps `sliding_window - 1` keys), or
  `StaticLayer` / `StaticSlidingWindowLayer` in the static-shape cache;
- linear layers ("gla", "gdn", "rla", "rdn") use `LinAttnLinearLayer`: the recurrent states (S, R),
  each [B, H, K, V] in fp32 (R is None for gla/gdn), and the conv window [B, C, conv_size - 1]
  (the last inputs of the causal depthwise conv). The model's linear layers read it with
  `linear_state()` and write it with `update_linear()`.

Rollback (speculative decoding, prompt lookup, lookahead): after `activate_past_recording()`, every
forward also keeps, per linear layer, a record from which the state after each of its positions
is recovered, and its conv inputs; transformers' sliding layers keep their keys until the next
crop. `crop(-n)` then restores exactly the state after all but the last n tokens since the
previous crop. transformers' generate() reads `is_linear`, `is_croppable` and `is_compileable`
from the layers, as for its own caches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import (
    Cache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionCacheLayerMixin,
    StaticLayer,
    StaticSlidingWindowLayer,
)

from .configuration_linattn import LINEAR_LAYER_TYPES, LinAttnConfig

State = tuple[torch.Tensor, torch.Tensor | None]


@dataclass
class StepRecord:
    """The state before a forward and after each of its T positions (the token-by-token record)."""

    before: State | None
    after: list[State]

    @property
    def length(self) -> int:
        return len(self.after)

    def state_after(self, j: int) -> State | None:
        """(S, R) after the first j positions (j = 0: the state the forward started from)."""
        return self.before if j == 0 else self.after[j - 1]

    def select(self, indices: torch.Tensor) -> StepRecord:
        def pick(s: State | None) -> State | None:
            return None if s is None else (s[0][indices], None if s[1] is None else s[1][indices])

        return StepRecord(pick(self.before), [pick(s) for s in self.after])

    def nbytes(self) -> int:
        states = [s for s in (self.before, *self.after) if s is not None]
        return sum(t.numel() * t.element_size() for s in states for t in s if t is not None)


class LinAttnLinearLayer(LinearAttentionCacheLayerMixin):
    """Cache of one linear-attention layer: recurrent states, conv window, and the rollback record."""

    is_sliding = False

    def __init__(self, conv_size: int, max_rollback: int = 64):
        super().__init__(number_of_states=1)
        self.conv_width = conv_size - 1
        self.max_rollback = max_rollback
        self.state: State | None = None
        self.conv: torch.Tensor | None = None
        self.cumulative_length = 0
        # since the last crop, per forward: (record of its logged positions, its conv inputs [B, C, width + T])
        self.history: list[tuple[StepRecord, torch.Tensor]] = []
        self.unlogged = 0  # positions since the last crop that fell out of the max_rollback window

    # ---- transformers' cache-layer protocol ----
    @property
    def is_croppable(self) -> bool:
        return True  # `crop` restores the states exactly from the record

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

    def activate_past_recording(self) -> None:
        self.record_past = True
        self.history, self.unlogged = [], 0

    def update(self, *, state: State, conv_inputs: torch.Tensor, record: StepRecord | None, num_tokens: int) -> None:
        """Store a forward's results: final state, conv inputs [B, C, width + T] and (while recording) its record."""
        self.state = state
        self.conv = conv_inputs[:, :, conv_inputs.shape[-1] - self.conv_width :]
        self.cumulative_length += num_tokens
        if self.record_past:
            if record is None:
                raise ValueError("a recording cache needs the forward's per-position record")
            self.unlogged += num_tokens - record.length
            # the conv inputs of the logged positions, after the conv_width inputs that precede them
            self.history.append((record, conv_inputs[:, :, conv_inputs.shape[-1] - self.conv_width - record.length :]))

    def logged_tokens(self) -> int:
        return sum(record.length for record, _ in self.history)

    def crop(self, tokens_to_remove: int) -> None:
        """Undo the last ``-tokens_to_remove`` tokens (<= 0) exactly; ``crop(0)`` only drops the record."""
        remove = -tokens_to_remove
        if remove and not self.record_past:
            raise RuntimeError("crop needs activate_past_recording() before the tokens to undo were processed")
        logged = self.logged_tokens()
        if remove > logged:
            raise RuntimeError(
                f"cannot roll back {remove} tokens: only the last {logged} were logged "
                f"(max_rollback={self.max_rollback})"
            )
        if remove:
            keep = logged - remove
            for record, conv_inputs in self.history:
                if keep <= record.length:
                    self.state = record.state_after(keep)
                    self.conv = conv_inputs[:, :, keep : keep + self.conv_width]
                    break
                keep -= record.length
            self.cumulative_length -= remove
        self.history, self.unlogged = [], 0

    def _select_rows(self, indices: torch.Tensor) -> None:
        """Keep (and reorder, or repeat) batch rows: every tensor held becomes ``tensor[indices]``."""
        if self.state is not None:
            S, R = self.state
            indices = indices.to(S.device)
            self.state = (S[indices], None if R is None else R[indices])
        if self.conv is not None:
            self.conv = self.conv[indices.to(self.conv.device)]
        self.history = [(record.select(indices), conv[indices.to(conv.device)]) for record, conv in self.history]

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
        self.history, self.unlogged = [], 0

    def offload(self) -> None:
        """Linear layers are small and stay on their device (transformers never offloads linear layers)."""

    def prefetch(self) -> None:
        """See `offload`."""

    def nbytes(self) -> int:
        tensors = [self.conv, *(self.state or ())]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def recording_nbytes(self) -> int:
        return sum(r.nbytes() + c.numel() * c.element_size() for r, c in self.history)


class LinAttnStaticLinearLayer(LinearAttentionCacheLayerMixin):
    """Static-shape cache of one linear layer: fixed buffers updated in place, so compiled decode steps (and CUDA
    graphs) replay with the same addresses. It does not roll back (use `LinAttnCache` for assisted decoding)."""

    is_sliding = False
    is_croppable = False

    def __init__(self, conv_size: int):
        super().__init__(number_of_states=1)
        self.conv_width = conv_size - 1
        self.state: State | None = None
        self.conv: torch.Tensor | None = None
        self.cumulative_length = torch.tensor(0, dtype=torch.long)

    @property
    def is_compileable(self) -> bool:
        return True

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    def get_seq_length(self) -> torch.Tensor | int:
        return self.cumulative_length if self.state is not None else 0

    def get_max_length(self) -> int:
        return -1

    def lazy_initialization(self, *, state: State, conv: torch.Tensor) -> None:
        """Allocate the buffers like the first forward's results, and pin their addresses for compiled steps."""
        S, R = state
        self.state = (torch.zeros_like(S), None if R is None else torch.zeros_like(R))
        self.conv = torch.zeros_like(conv)
        self.cumulative_length = self.cumulative_length.to(S.device)
        if not torch.compiler.is_compiling():
            for t in (*self.state, self.conv, self.cumulative_length):
                if t is not None:
                    torch._dynamo.mark_static_address(t)

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        raise NotImplementedError("hf_linattn layers update their cache with update_linear")

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        raise NotImplementedError("hf_linattn layers update their cache with update_linear")

    def activate_past_recording(self) -> None:
        raise NotImplementedError(
            "the static cache does not roll back: assisted decoding, prompt lookup and lookahead need the default "
            "cache (LinAttnCache)"
        )

    def update(self, *, state: State, conv_inputs: torch.Tensor, record: StepRecord | None, num_tokens: int) -> None:
        conv = conv_inputs[:, :, conv_inputs.shape[-1] - self.conv_width :]
        if self.state is None:
            self.lazy_initialization(state=state, conv=conv)
        self.state[0].copy_(state[0])
        if state[1] is not None:
            self.state[1].copy_(state[1])
        self.conv.copy_(conv)
        self.cumulative_length.add_(num_tokens)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("the static cache does not roll back; use LinAttnCache")

    def _select_rows(self, indices: torch.Tensor) -> None:
        if self.state is not None:
            for t in (*self.state, self.conv):
                if t is not None:
                    t.copy_(t[indices.to(t.device)])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def reset(self) -> None:
        if self.state is not None:
            for t in (*self.state, self.conv):
                if t is not None:
                    t.zero_()
        self.cumulative_length.zero_()

    def offload(self) -> None:
        """Linear layers stay on their device."""

    def prefetch(self) -> None:
        """See `offload`."""

    def nbytes(self) -> int:
        tensors = [self.conv, *(self.state or ())]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def recording_nbytes(self) -> int:
        return 0


class _LinAttnCacheBase(Cache):
    """What the model's layers and generate() use of both caches: the linear-layer accessors and the queries."""

    max_rollback = 64

    def linear_state(self, layer_idx: int) -> tuple[State | None, torch.Tensor | None]:
        """((S, R) or None, conv window [B, C, conv_size - 1] or None) of a linear layer."""
        layer = self.layers[layer_idx]
        return layer.state, layer.conv

    def update_linear(
        self, layer_idx: int, *, state: State, conv_inputs: torch.Tensor, record: StepRecord | None, num_tokens: int
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
        """Bytes held by the rollback record (per-position states and conv inputs of the linear layers)."""
        return sum(layer.recording_nbytes() for layer in self.layers if hasattr(layer, "recording_nbytes"))


class LinAttnCache(_LinAttnCacheBase):
    """Generation cache of [`LinAttnForCausalLM`], one layer per model layer; created empty, filled by forwards."""

    def __init__(self, config: LinAttnConfig, max_rollback: int = 64):
        layers = []
        for mixer in config.mixer_types:
            if mixer in LINEAR_LAYER_TYPES:
                layers.append(LinAttnLinearLayer(config.linear_conv_size, max_rollback=max_rollback))
            elif mixer == "sliding_attention":
                layers.append(DynamicSlidingWindowLayer(sliding_window=config.sliding_window))
            else:
                layers.append(DynamicLayer())
        super().__init__(layers=layers)
        self.max_rollback = max_rollback

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(super().get_seq_length(layer_idx))

    def crop(self, max_length: int) -> None:
        """Undo tokens: ``crop(-n)`` removes the last n (exact for every layer kind); ``crop(L)``, L > 0, keeps
        the first L. ``crop(0)`` only drops the rollback record."""
        remove = -max_length if max_length <= 0 else self.get_seq_length() - max_length
        if remove < 0:
            raise ValueError(f"cannot crop to {max_length} tokens: the cache holds {self.get_seq_length()}")
        for layer in self.layers:
            layer.crop(-remove)


class LinAttnStaticCache(_LinAttnCacheBase):
    """Static-shape cache for compiled decoding (``generate(..., cache_implementation="static")``): preallocated
    keys/values (transformers' static layers, ``max_cache_len`` positions) and in-place linear states."""

    def __init__(self, config: LinAttnConfig, max_cache_len: int):
        layers = []
        for mixer in config.mixer_types:
            if mixer in LINEAR_LAYER_TYPES:
                layers.append(LinAttnStaticLinearLayer(config.linear_conv_size))
            elif mixer == "sliding_attention":
                window = config.sliding_window
                layers.append(StaticSlidingWindowLayer(max_cache_len=max_cache_len, sliding_window=window))
            else:
                layers.append(StaticLayer(max_cache_len=max_cache_len))
        super().__init__(layers=layers)
        self.max_cache_len = max_cache_len


__all__ = ["LinAttnCache", "LinAttnLinearLayer", "LinAttnStaticCache", "LinAttnStaticLinearLayer", "StepRecord"]
