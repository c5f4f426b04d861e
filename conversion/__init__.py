"""Linearizing Llama / Qwen2 / Qwen3 checkpoints (``hf_linattn.conversion``).

So far: weight transfer (``transfer.py``) and stage-1 attention transfer (``attention_transfer.py``).
LoRA recovery, hybrid layer selection, evaluation and the CLI arrive with the conversion issue.
"""

from .attention_transfer import attention_transfer, layer_errors
from .transfer import (
    SUPPORTED_MODEL_TYPES,
    UnsupportedBaseModelError,
    linear_config_from_base,
    linearize,
    transfer_weights,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "UnsupportedBaseModelError",
    "attention_transfer",
    "layer_errors",
    "linear_config_from_base",
    "linearize",
    "transfer_weights",
]
