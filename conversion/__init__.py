"""Linearizing Llama / Qwen2 / Qwen3 checkpoints (``hf_linattn.conversion``).

So far, as library functions: weight transfer (``transfer.py``), stage-1 attention transfer
(``attention_transfer.py``), stage-2 PEFT LoRA recovery (``lora.py``) and hybrid layer selection
(``selection.py``). Resumable runs on accelerate, evaluation, the embedded teacher and the CLI arrive with the
conversion issue.
"""

from .attention_transfer import attention_transfer, layer_errors
from .lora import lora_recover, recovery_loss
from .selection import hybrid_layer_types, select_softmax_layers
from .training import NonFiniteLossError
from .transfer import (
    SUPPORTED_MODEL_TYPES,
    UnsupportedBaseModelError,
    linear_config_from_base,
    linearize,
    transfer_weights,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "NonFiniteLossError",
    "UnsupportedBaseModelError",
    "attention_transfer",
    "hybrid_layer_types",
    "layer_errors",
    "linear_config_from_base",
    "linearize",
    "lora_recover",
    "recovery_loss",
    "select_softmax_layers",
    "transfer_weights",
]
