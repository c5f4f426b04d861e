"""Which layers stay softmax in a hybrid: measured by stage-1 error, or named explicitly."""

from __future__ import annotations

from transformers import PreTrainedConfig

from hf_linattn.modeling import LINEAR_LAYER_TYPES


def select_softmax_layers(stage1_errors: dict[int, float], keep: int) -> list[int]:
    """The ``keep`` layers whose linear replacement matched the base attention worst (sorted indices).

    Ties break toward the lower layer index, so the choice is deterministic.
    """
    if not 0 <= keep <= len(stage1_errors):
        raise ValueError(f"keep must be between 0 and the number of measured layers ({len(stage1_errors)}); got {keep}")
    ranked = sorted(stage1_errors, key=lambda i: (-stage1_errors[i], i))
    return sorted(ranked[:keep])


def hybrid_layer_types(base_config: PreTrainedConfig, mode: str, keep_softmax_layers: list[int]) -> list[str]:
    """``mode`` everywhere except ``keep_softmax_layers``, which keep the base layer's own attention type."""
    if mode not in LINEAR_LAYER_TYPES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {LINEAR_LAYER_TYPES}")
    n = base_config.num_hidden_layers
    bad = [i for i in keep_softmax_layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"softmax layer indices {bad} are out of range for a {n}-layer model")
    base_types = list(getattr(base_config, "layer_types", None) or ["full_attention"] * n)
    return [base_types[i] if i in keep_softmax_layers else mode for i in range(n)]
