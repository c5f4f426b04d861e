"""Which layers stay softmax in a hybrid: by stage-1 error, evenly spaced, KL-guided, or named explicitly.

- ``error``: the layers whose linear replacement matched the base attention worst in stage 1 (free);
- ``even``: the middle layer of each of ``keep`` equal groups (what hand-designed hybrids do);
- ``kl``: one short stage-2 run per candidate layer kept softmax, ranked by KL to the teacher
  (fla-org/hybrid-distillation); costs ``num_layers x selection_steps`` LoRA steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedConfig, PreTrainedModel

from hf_linattn.modeling import LINEAR_LAYER_TYPES

SELECTIONS = ("error", "even", "kl")


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


def evenly_spaced_layers(num_layers: int, keep: int) -> list[int]:
    """``keep`` layers at the middle of ``keep`` equal groups of ``num_layers`` (8 layers, keep 2: [2, 6])."""
    if not 0 <= keep <= num_layers:
        raise ValueError(f"keep must be between 0 and {num_layers}; got {keep}")
    return [int((j + 0.5) * num_layers / keep) for j in range(keep)]


@torch.no_grad()
def kl_to_teacher(student: PreTrainedModel, teacher: PreTrainedModel, input_ids: torch.Tensor) -> float:
    """Mean per-token KL(teacher || student) on input_ids [B, T]."""
    log_q = student(input_ids=input_ids, use_cache=False).logits.float().log_softmax(-1).flatten(0, 1)
    log_p = teacher(input_ids=input_ids, use_cache=False).logits.float().log_softmax(-1).flatten(0, 1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean").item()


def kl_guided_scores(
    teacher: PreTrainedModel,
    build_student: Callable[[list[int]], PreTrainedModel],
    batches: Sequence[torch.Tensor],
    probe: torch.Tensor,
    lr: float,
    progress: bool = True,
) -> dict[int, float]:
    """KL-guided layer selection (fla's hybrid distillation): one short stage 2 per candidate layer.

    For every layer i, ``build_student([i])`` (layer i softmax, the others linear with their stage-1
    pieces) trains LoRA on KL for ``len(batches)`` steps, then its KL to ``teacher`` on ``probe``
    [B, T] is the score of i. A lower score means that giving layer i back its softmax attention
    helps more. Runs in this process alone (deterministic, so every process of a DDP run agrees).
    """
    from .lora import lora_recover  # the tuner pulls in peft; selection by error does not need it

    scores: dict[int, float] = {}
    layers = range(teacher.config.num_hidden_layers)
    for i in tqdm(layers, desc="KL-guided selection", disable=not progress):
        student, _ = lora_recover(build_student([i]), batches, len(batches), teacher=teacher, loss="kl", lr=lr,
                                  progress=False)  # fmt: skip
        scores[i] = round(kl_to_teacher(student.eval(), teacher, probe), 6)
    return scores


def select_by_score(scores: dict[int, float], keep: int) -> list[int]:
    """The ``keep`` layers with the lowest score (sorted; ties toward the lower index)."""
    return sorted(sorted(scores, key=lambda i: (scores[i], i))[:keep])
