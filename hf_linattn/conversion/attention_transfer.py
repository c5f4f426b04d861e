"""Stage 1 of linearization: attention transfer (LoLCATs, RADLADS step 1).

Every linear layer learns to reproduce its base layer's softmax-attention output on the same
input hidden states, independently of the other layers (teacher forcing: inputs come from the
base model, so layers train in parallel). The new pieces of a linear layer train (short conv,
decay / write gates, output gate and norm); the q/k/v/o projections and q/k norms copied from the
base stay frozen (LoLCATs) or train too at a lower rate (``train``: "qk", or "all" as RADLADS),
which the conversion does by default (docs/benchmarks.md, section 13). The per-layer error
measured here is also what hybrid selection ranks layers by.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedModel

from hf_linattn.modeling import LinAttnForCausalLM
from hf_linattn.modeling.linear_attention_linattn import LinAttnLinearAttention

from .checkpoint import StageCheckpoint
from .data import shard
from .training import run_steps

# Parameters of a linear layer that come from the base model.
TRANSFERRED = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
# Which of them stage 1 trains beside the new pieces: none (LoLCATs), the query/key side, which plays the part of
# a learned feature map, or every attention weight (RADLADS step 1).
ATTENTION_TRANSFER_PARAMS = {"new": (), "qk": ("q_proj", "k_proj", "q_norm", "k_norm"), "all": TRANSFERRED}


def new_parameters(layer: LinAttnLinearAttention) -> list[nn.Parameter]:
    """The parameters of a linear layer that the base model did not provide."""
    return [p for name, p in layer.named_parameters() if name.split(".")[0] not in TRANSFERRED]


def stage1_parameters(layer: LinAttnLinearAttention, train: str = "new") -> dict[str, nn.Parameter]:
    """A linear layer's parameters that stage 1 trains: the new pieces and ``ATTENTION_TRANSFER_PARAMS[train]``."""
    if train not in ATTENTION_TRANSFER_PARAMS:
        choices = tuple(ATTENTION_TRANSFER_PARAMS)
        raise ValueError(f"unknown stage-1 parameter set {train!r}; expected one of {choices}")
    also = ATTENTION_TRANSFER_PARAMS[train]
    return {
        name: p
        for name, p in layer.named_parameters()
        if name.split(".")[0] not in TRANSFERRED or name.split(".")[0] in also
    }


@torch.no_grad()
def capture_attention_io(
    base: PreTrainedModel, input_ids: torch.Tensor, layers: Iterable[int]
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Run ``base`` on input_ids [B, T]; return {layer: (attention input [B, T, D], attention output [B, T, D])}."""
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for i in layers:

        def hook(module, args, kwargs, output, i=i):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[i] = (hidden.detach(), output[0].detach())

        handles.append(base.model.layers[i].self_attn.register_forward_hook(hook, with_kwargs=True))
    try:
        base(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def layer_errors(base: PreTrainedModel, model: LinAttnForCausalLM, input_ids: torch.Tensor) -> dict[int, float]:
    """Relative MSE ||student - teacher||^2 / ||teacher||^2 of every linear layer's attention output."""
    linear = _linear_layers(model)
    captured = capture_attention_io(base, input_ids, linear)
    position_embeddings = _position_embeddings(model, input_ids)
    errors = {}
    with torch.no_grad():
        for i, layer in linear.items():
            hidden, target = captured[i]
            out, _ = layer(hidden, position_embeddings, None)
            errors[i] = (F.mse_loss(out.float(), target.float()) / target.float().pow(2).mean()).item()
    return errors


class AttentionTransferObjective(nn.Module):
    """Summed per-layer relative MSE of the linear layers against the base attention outputs.

    A module, so accelerate can wrap it in DDP: its trainable parameters are exactly the new pieces.
    """

    def __init__(self, layers: dict[int, LinAttnLinearAttention]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({str(i): layer for i, layer in layers.items()})

    def forward(
        self,
        captured: dict[int, tuple[torch.Tensor, torch.Tensor]],
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        loss = 0.0
        for key, layer in self.layers.items():
            hidden, target = captured[int(key)]
            out, _ = layer(hidden, position_embeddings, None)
            loss = loss + F.mse_loss(out.float(), target.float()) / target.float().pow(2).mean()
        return loss


def attention_transfer(
    base: PreTrainedModel,
    model: LinAttnForCausalLM,
    batches: Sequence[torch.Tensor],
    steps: int,
    lr: float = 1e-2,
    progress: bool = True,
    accelerator: Accelerator | None = None,
    checkpoint: StageCheckpoint | None = None,
    schedule: str = "constant",
    train: str = "new",
    weights_lr: float = 3e-3,
) -> list[float]:
    """Train every linear layer of ``model`` to match ``base``'s attention outputs.

    batches: global batches of input_ids [B, T]; step s uses ``batches[s % len(batches)]`` (under
    accelerate, this process's rows of it). With ``checkpoint``, the run saves itself as it goes and
    resumes from the last save. ``lr`` is the peak of ``schedule`` (``training.LR_SCHEDULES``). ``train``
    names what trains beside the new pieces (``ATTENTION_TRANSFER_PARAMS``); those copied weights peak at
    ``weights_lr``, far below ``lr``, since they start trained. Returns the summed per-layer relative MSE of
    every step.
    """
    linear = _linear_layers(model)
    if not linear:
        raise ValueError("the model has no linear-attention layer to train")
    for p in model.parameters():
        p.requires_grad_(False)
    params = {f"{i}.{name}": p for i, layer in linear.items() for name, p in stage1_parameters(layer, train).items()}
    for p in params.values():
        p.requires_grad_(True)
    objective = AttentionTransferObjective(linear)
    # Two Adam groups in a fixed order (a resumed run maps optimizer moments by position): new pieces, copied weights.
    copied = {name: name.split(".")[1] in TRANSFERRED for name in params}
    groups = [{"params": [p for name, p in params.items() if copied[name] == c], "lr": peak}
              for c, peak in ((False, lr), (True, weights_lr))]  # fmt: skip
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    if accelerator is not None:
        objective, optimizer = accelerator.prepare(objective, optimizer)
    base.eval()
    model.train()

    def loss_for_step(step: int) -> torch.Tensor:
        input_ids = shard(batches[step % len(batches)], rank, world).to(model.device)
        captured = capture_attention_io(base, input_ids, linear)
        return objective(captured, _position_embeddings(model, input_ids))

    stage = "attention transfer"
    history = run_steps(loss_for_step, params, optimizer, steps, stage, checkpoint=checkpoint, accelerator=accelerator,
                        progress=progress, schedule=schedule)  # fmt: skip
    model.eval()
    return history


def _linear_layers(model: LinAttnForCausalLM) -> dict[int, LinAttnLinearAttention]:
    return {
        i: layer.self_attn
        for i, layer in enumerate(model.model.layers)
        if isinstance(layer.self_attn, LinAttnLinearAttention)
    }


def _position_embeddings(model: LinAttnForCausalLM, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, T = input_ids.shape
    position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
    dummy = model.model.embed_tokens.weight[:1]
    return model.model.rotary_emb(dummy, position_ids)
