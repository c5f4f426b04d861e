"""Linearizing Llama / Qwen2 / Qwen3 checkpoints (``hf_linattn.conversion``).

The parts, one file each: base loading with input checks (``loading.py``), weight transfer
(``transfer.py``), stage-1 attention transfer (``attention_transfer.py``), stage-2 PEFT LoRA
recovery (``lora.py``), hybrid layer selection (``selection.py``), data (``data.py``), resumable
training state (``checkpoint.py``, ``training.py``), evaluation (``evaluate.py``, ``generation_eval.py``,
``lm_eval_task.py``),
what an output folder may be replaced by (``output.py``) and the whole resumable run behind
``hf-linattn convert`` (``pipeline.py``).
"""

from .attention_transfer import attention_transfer, layer_errors
from .data import DataError
from .evaluate import evaluate_checkpoint, greedy_agreement, perplexity
from .generation_eval import EvalInputError, complete_lines, completion_prompts, passkey_accuracy
from .loading import IncompleteWeightsError, MissingCheckpointFileError, TokenizerMismatchError, load_base
from .lora import lora_recover, recovery_loss
from .output import RecipeMismatchError
from .pipeline import ConversionRecipe, RecipeError, convert
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
    "ConversionRecipe",
    "DataError",
    "EvalInputError",
    "IncompleteWeightsError",
    "MissingCheckpointFileError",
    "NonFiniteLossError",
    "RecipeError",
    "RecipeMismatchError",
    "TokenizerMismatchError",
    "UnsupportedBaseModelError",
    "attention_transfer",
    "complete_lines",
    "completion_prompts",
    "convert",
    "evaluate_checkpoint",
    "greedy_agreement",
    "hybrid_layer_types",
    "layer_errors",
    "linear_config_from_base",
    "linearize",
    "load_base",
    "lora_recover",
    "passkey_accuracy",
    "perplexity",
    "recovery_loss",
    "select_softmax_layers",
    "transfer_weights",
]
