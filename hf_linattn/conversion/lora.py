"""Stage 2 of linearization: recovery with PEFT LoRA (LoLCATs stage 2, Liger).

LoRA adapters on q/k/v/o (and optionally the MLP) train the whole converted model on
next-token cross-entropy, on KL to the base model's logits, or on both. With ``train_mixers``
the linear layers' own new pieces (short conv, decay / write gates, output gate and norm, the
parameters stage 1 trained) also train in full, as RADLADS fine-tunes its new mixers. The
adapter is saved on its own and then merged, so the result is a plain LinAttnForCausalLM again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedModel

from hf_linattn.modeling import LinAttnForCausalLM
from hf_linattn.modeling.linear_attention_linattn import LinAttnLinearAttention

from .attention_transfer import new_parameters
from .checkpoint import StageCheckpoint
from .data import shard
from .training import run_steps

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
    batches: Sequence[torch.Tensor],
    steps: int,
    teacher: PreTrainedModel | None = None,
    loss: str = "ce",
    lr: float = 1e-4,
    rank: int = 8,
    alpha: int = 16,
    include_mlp: bool = False,
    train_mixers: bool = False,
    adapter_dir: str | Path | None = None,
    progress: bool = True,
    accelerator: Accelerator | None = None,
    checkpoint: StageCheckpoint | None = None,
    schedule: str = "constant",
) -> tuple[LinAttnForCausalLM, list[float]]:
    """Train LoRA adapters on ``model``, save them to ``adapter_dir`` (if given), merge them.

    batches: global batches of input_ids [B, T]; step s uses ``batches[s % len(batches)]`` (under
    accelerate, this process's rows). ``teacher`` is needed for "kl" losses. With ``checkpoint`` the
    run saves itself as it goes and resumes from the last save. ``train_mixers``: the linear layers' new
    pieces train too (in full; they live in the merged weights, not in the adapter). ``lr`` is the peak of
    ``schedule`` (``training.LR_SCHEDULES``). Returns the merged model and the losses.
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
    if train_mixers:
        for layer in peft_model.base_model.model.model.layers:
            if isinstance(layer.self_attn, LinAttnLinearAttention):
                for p in new_parameters(layer.self_attn):
                    p.requires_grad_(True)
    params = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    proc, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    trained = peft_model
    if accelerator is not None:
        trained, optimizer = accelerator.prepare(peft_model, optimizer)
    trained.train()

    def loss_for_step(step: int) -> torch.Tensor:
        input_ids = shard(batches[step % len(batches)], proc, world).to(peft_model.device)
        teacher_logits = None
        if "kl" in loss:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits
        logits = trained(input_ids=input_ids, use_cache=False).logits
        return recovery_loss(logits, input_ids, teacher_logits, loss)

    history = run_steps(loss_for_step, params, optimizer, steps, f"LoRA recovery ({loss})", checkpoint=checkpoint,
                        accelerator=accelerator, progress=progress, schedule=schedule)  # fmt: skip
    peft_model.eval()
    if adapter_dir is not None and (accelerator is None or accelerator.is_main_process):
        peft_model.save_pretrained(str(adapter_dir))
    merged = peft_model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged, history
