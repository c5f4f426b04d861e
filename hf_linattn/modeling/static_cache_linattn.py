"""The static-shape cache of hf_linattn models, for compiled decoding (``cache_implementation="static"``).

Keys and values live in transformers' `StaticLayer` / `StaticSlidingWindowLayer` (``max_cache_len``
positions, preallocated); the linear layers' states in fixed buffers updated in place, so a compiled
decode step (and a CUDA graph) replays with the same addresses. It does not roll back.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import LinearAttentionCacheLayerMixin, StaticLayer, StaticSlidingWindowLayer

from hf_linattn.kernels.block import BlockRecord

from .cache_linattn import State, _LinAttnCacheBase
from .configuration_linattn import LINEAR_LAYER_TYPES, LinAttnConfig


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

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None) -> None:
        raise NotImplementedError(
            "the static cache does not roll back: assisted decoding, prompt lookup and lookahead need the default "
            "cache (LinAttnCache)"
        )

    def update(self, *, state: State, conv_inputs: torch.Tensor, record: BlockRecord | None, num_tokens: int) -> None:
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


__all__ = ["LinAttnStaticCache", "LinAttnStaticLinearLayer"]
