"""Linearizing Llama / Qwen2 / Qwen3 checkpoints (``hf_linattn.conversion``).

So far: weight transfer (``transfer.py``). Attention transfer, LoRA recovery, layer selection and
the CLI arrive with the conversion issue.
"""

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
    "linear_config_from_base",
    "linearize",
    "transfer_weights",
]
