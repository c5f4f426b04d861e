"""Stage 2 of linearization: recovery with PEFT LoRA (LoLCATs stage 2, Liger).

LoRA adapters on q/k/v/o (and optionally the MLP) train the whole converted model on
next-token cross-entropy, on KL to the base model's logits, or on both. The adapter is saved
on its own and then merged, so the result is a plain LinAttnForCausalLM again.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..modeling import LinAttnForCausalLM
from .training import checked_step

LOSSES = ("ce", "kl", "ce+kl")
ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP_TARGETS = ["gate_proj", "up_proj", "down_proj"]


def recovery_loss(
    student_logits: torch.Tensor, input_ids: torch.Tensor, teacher_logits: torch.Tensor | None, loss: str
) -> torch.Tensor:
    """Mean next-token CE, KL(teacher || student) per token, or their sum. Logits [B, T, V]."""
    terms = []
    if "ce" in loss.split("+"):
        terms.append(F.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten()))
    if "kl" in loss.split("+"):
        log_p_student = F.log_softmax(student_logits.float(), -1).flatten(0, 1)
        log_p_teacher = F.log_softmax(teacher_logits.float(), -1).flatten(0, 1)
        terms.append(F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean"))
    return sum(terms)


def lora_recover(
    model: LinAttnForCausalLM,
    batches: Iterable[torch.Tensor],
    steps: int,
    teacher: PreTrainedModel | None = None,
    loss: str = "ce",
    lr: float = 1e-4,
    rank: int = 8,
    alpha: int = 16,
    include_mlp: bool = False,
    adapter_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[LinAttnForCausalLM, list[float]]:
    """Train LoRA adapters on ``model``, save them to ``adapter_dir`` (if given), merge them.

    batches: input_ids [B, T], cycled for ``steps`` steps. ``teacher`` is needed for "kl" losses.
    Returns the merged model and the loss of every step.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
    if "kl" in loss:
        if teacher is None:
            raise ValueError(f"loss {loss!r} needs the teacher model")
        if teacher.config.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"teacher vocab ({teacher.config.vocab_size}) != student vocab ({model.config.vocab_size}): "
                "KL needs the same tokenizer"
            )
        teacher.eval()
    targets = ATTENTION_TARGETS + (MLP_TARGETS if include_mlp else [])
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, bias="none")
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    peft_model.train()
    batches = list(batches)
    history = []
    bar = tqdm(range(steps), desc=f"LoRA recovery ({loss})", disable=not progress)
    for step in bar:
        input_ids = batches[step % len(batches)]
        teacher_logits = None
        if teacher is not None and "kl" in loss:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits
        logits = peft_model(input_ids=input_ids, use_cache=False).logits
        value = recovery_loss(logits, input_ids, teacher_logits, loss)
        history.append(checked_step(optimizer, value, "LoRA", step))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    peft_model.eval()
    if adapter_dir is not None:
        peft_model.save_pretrained(str(adapter_dir))
    merged = peft_model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged, history
