"""The whole conversion: load, stage 1, layer selection, stage 2, save, evaluate, report; resumable.

``convert`` is what ``hf-linattn convert`` runs. Its state lives in ``OUTPUT/.conversion/``:

- ``recipe.json``: the run's recipe; a rerun with another recipe is refused instead of mixing runs;
- ``stage1.safetensors`` / ``stage2.safetensors``: training state saved every ``checkpoint_every`` steps;
- ``stage1_done.safetensors``: the trained new pieces of every layer and the per-layer stage-1 errors.

A run killed at any point (kill -9 included) restarts from the last save and ends with the same
weights as an uninterrupted run, because batches are a function of (seed, step) and parameters,
optimizer moments and step counters are all restored.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from safetensors import safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hf_linattn.modeling import LINEAR_LAYER_TYPES, LinAttnForCausalLM

from .attention_transfer import TRANSFERRED, attention_transfer, layer_errors
from .checkpoint import StageCheckpoint, atomic_save
from .data import batch_for_step, read_text_sources, token_stream
from .evaluate import greedy_agreement, perplexity, windows
from .loading import load_base
from .lora import LOSSES, lora_recover
from .selection import hybrid_layer_types, select_softmax_layers
from .transfer import linearize

WORK_DIR = ".conversion"
REPORT_NAME = "conversion_report.json"


class RecipeMismatchError(ValueError):
    """The output folder holds an unfinished conversion with a different recipe."""


@dataclass
class ConversionRecipe:
    """Everything that determines a conversion's result (saved in the report and the model card)."""

    base: str = "embedded-teacher"
    mode: str = "rdn"
    keep_softmax: int = 0
    keep_softmax_layers: list[int] | None = None
    attention_transfer_steps: int = 100
    attention_transfer_lr: float = 1e-2
    lora_steps: int = 100
    lora_lr: float = 1e-3
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_mlp: bool = False
    loss: str = "kl"
    batch_size: int = 4
    seq_len: int = 512
    linear_use_rotary: bool = False
    residual_clip: float = 1.0
    seed: int = 0
    data: list[str] = field(default_factory=list)
    max_train_tokens: int = 4_000_000
    eval_data: list[str] = field(default_factory=list)
    eval_tokens: int = 65536
    agreement_prompts: int = 8
    checkpoint_every: int = 25

    def check(self) -> None:
        if self.mode not in LINEAR_LAYER_TYPES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {LINEAR_LAYER_TYPES}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; expected one of {LOSSES}")
        if self.keep_softmax and self.keep_softmax_layers is not None:
            raise ValueError("give --keep-softmax N or --keep-softmax-layers i,j, not both")
        for name in ("attention_transfer_steps", "lora_steps", "keep_softmax"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "seq_len", "checkpoint_every", "eval_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


def _embedded(base: str) -> Path | None:
    from hf_linattn.assets import TEACHER_DIR

    return TEACHER_DIR if base == "embedded-teacher" else None


def resolve_base(base: str) -> str:
    """The path or hub id to load for a recipe's ``base`` ("embedded-teacher" is the shipped teacher)."""
    return str(_embedded(base) or base)


def train_and_eval_tokens(
    recipe: ConversionRecipe, tokenizer: PreTrainedTokenizerBase
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training stream (``--data``, else the stdlib corpus) and held-out stream (``--eval-data``, else heldout.txt)."""
    from hf_linattn.assets import heldout_texts, training_texts

    train_texts = [t for _, t in read_text_sources(recipe.data)] if recipe.data else training_texts()
    eval_texts = [t for _, t in read_text_sources(recipe.eval_data)] if recipe.eval_data else heldout_texts()
    train = token_stream(tokenizer, train_texts, max_tokens=recipe.max_train_tokens)
    held = token_stream(tokenizer, eval_texts, max_tokens=recipe.eval_tokens)
    return train, held


def _open_work_dir(output: Path, recipe: ConversionRecipe, restart: bool, main: bool) -> Path:
    work = output / WORK_DIR
    saved = work / "recipe.json"
    mine = dataclasses.asdict(recipe)
    if restart and main and work.exists():
        shutil.rmtree(work)
    if saved.exists():
        theirs = json.loads(saved.read_text())
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            raise RecipeMismatchError(
                f"{output} holds an unfinished conversion with another recipe (saved vs now: {diff}); "
                "rerun with the same settings to resume, pass --restart to discard it, or pick another --output"
            )
    elif main:
        work.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(mine, indent=2))
    return work


def _new_piece_names(model: LinAttnForCausalLM) -> list[str]:
    """Names of the linear layers' parameters that the base model does not provide (conv, gates, norms)."""
    linear = {str(i) for i in linear_layer_indices(model)}
    return [
        name
        for name, _ in model.named_parameters()
        if ".self_attn." in name
        and name.split(".")[2] in linear
        and name.split(".self_attn.")[1].split(".")[0] not in TRANSFERRED
    ]


def linear_layer_indices(model: LinAttnForCausalLM) -> list[int]:
    return [i for i, t in enumerate(model.config.mixer_types) if t in LINEAR_LAYER_TYPES]


def _config_overrides(recipe: ConversionRecipe) -> dict:
    return {"linear_use_rotary": recipe.linear_use_rotary, "residual_clip": recipe.residual_clip}


def run_stage1(
    base: PreTrainedModel,
    recipe: ConversionRecipe,
    train: torch.Tensor,
    held: torch.Tensor,
    work: Path,
    accelerator: Accelerator,
    progress: bool,
) -> tuple[dict[str, torch.Tensor], list[float], list[float]]:
    """Attention transfer with every layer linear. Returns (new pieces by name, per-layer errors, losses)."""
    done = work / "stage1_done.safetensors"
    if done.exists():
        with safe_open(str(done), framework="pt") as f:
            meta = f.metadata()
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(meta["errors"]), json.loads(meta["losses"])  # noqa: SIM118
    n = base.config.num_hidden_layers
    torch.manual_seed(recipe.seed)
    model = linearize(base, [recipe.mode] * n, **_config_overrides(recipe)).to(accelerator.device)
    batches = [batch_for_step(train, s, recipe.batch_size, recipe.seq_len, recipe.seed)
               for s in range(recipe.attention_transfer_steps)]  # fmt: skip
    losses = []
    if batches:
        checkpoint = StageCheckpoint(work / "stage1.safetensors", recipe.checkpoint_every)
        losses = attention_transfer(base, model, batches, recipe.attention_transfer_steps, recipe.attention_transfer_lr,
                                    progress, accelerator, checkpoint)  # fmt: skip
    probe = windows(held, recipe.seq_len)[: max(1, recipe.batch_size)].to(accelerator.device)
    errors = layer_errors(base, model, probe)
    per_layer = [round(errors[i], 6) for i in range(n)]
    params = dict(model.named_parameters())
    pieces = {name: params[name].detach().cpu() for name in _new_piece_names(model)}
    if accelerator.is_main_process:
        atomic_save(pieces, done, {"errors": json.dumps(per_layer), "losses": json.dumps(losses)})
    accelerator.wait_for_everyone()
    return pieces, per_layer, losses


def choose_softmax_layers(recipe: ConversionRecipe, errors: list[float]) -> list[int]:
    if recipe.keep_softmax_layers is not None:
        return sorted(recipe.keep_softmax_layers)
    return select_softmax_layers(dict(enumerate(errors)), recipe.keep_softmax)


def convert(
    output: Path,
    recipe: ConversionRecipe,
    tokenizer_path: str | None = None,
    restart: bool = False,
    accelerator: Accelerator | None = None,
    progress: bool = True,
) -> dict:
    """Run (or resume) a conversion into ``output``; returns the report (also written as conversion_report.json)."""
    recipe.check()
    # Not every mode uses every gate (gla has no beta), so DDP must tolerate parameters without gradients.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])
    main = accelerator.is_main_process
    output = Path(output)
    started = time.time()
    base, tokenizer, stored_dtype = load_base(resolve_base(recipe.base), tokenizer_path)
    base.to(accelerator.device)
    n = base.config.num_hidden_layers
    if recipe.keep_softmax_layers is not None:
        hybrid_layer_types(base.config, recipe.mode, recipe.keep_softmax_layers)  # range check before any work
    if recipe.keep_softmax > n:
        raise ValueError(f"--keep-softmax {recipe.keep_softmax} exceeds the base model's {n} layers")
    if recipe.batch_size % accelerator.num_processes:
        raise ValueError(f"batch size {recipe.batch_size} does not split over {accelerator.num_processes} processes")
    work = _open_work_dir(output, recipe, restart, main)
    accelerator.wait_for_everyone()
    train, held = train_and_eval_tokens(recipe, tokenizer)

    pieces, errors, stage1_losses = run_stage1(base, recipe, train, held, work, accelerator, progress)
    kept = choose_softmax_layers(recipe, errors)
    layer_types = hybrid_layer_types(base.config, recipe.mode, kept)

    torch.manual_seed(recipe.seed + 1)
    student = linearize(base, layer_types, **_config_overrides(recipe))
    student.load_state_dict({k: v for k, v in pieces.items() if k in _new_piece_names(student)}, strict=False)
    student.to(accelerator.device)
    stage2_losses: list[float] = []
    if recipe.lora_steps and any(t in LINEAR_LAYER_TYPES for t in layer_types):
        batches = [batch_for_step(train, s, recipe.batch_size, recipe.seq_len, recipe.seed + 1)
                   for s in range(recipe.lora_steps)]  # fmt: skip
        student, stage2_losses = lora_recover(
            student, batches, recipe.lora_steps, teacher=base, loss=recipe.loss, lr=recipe.lora_lr,
            rank=recipe.lora_rank, alpha=recipe.lora_alpha, include_mlp=recipe.lora_mlp,
            adapter_dir=output / "lora_adapter", progress=progress, accelerator=accelerator,
            checkpoint=StageCheckpoint(work / "stage2.safetensors", recipe.checkpoint_every),
        )  # fmt: skip
    report: dict = {}
    if main:
        save_student(student, base, tokenizer, output, stored_dtype)
        report = evaluate_conversion(output, base, held, recipe, progress)
        report.update(
            recipe=dataclasses.asdict(recipe),
            base_model_type=base.config.model_type,
            num_layers=n,
            layer_types=layer_types,
            kept_softmax_layers=kept,
            stage1_layer_errors=errors,
            stage1_losses=stage1_losses,
            stage2_losses=stage2_losses,
            train_tokens_seen={
                "attention_transfer": recipe.attention_transfer_steps * recipe.batch_size * recipe.seq_len,
                "lora": recipe.lora_steps * recipe.batch_size * recipe.seq_len,
            },
            num_processes=accelerator.num_processes,
            seconds=round(time.time() - started, 1),
        )
        (output / REPORT_NAME).write_text(json.dumps(report, indent=2))
        from hf_linattn.hub_cards import write_model_card

        write_model_card(output, report)
    accelerator.wait_for_everyone()
    return report


def save_student(
    student: LinAttnForCausalLM,
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output: Path,
    dtype: torch.dtype,
) -> None:
    """The checkpoint in ``dtype`` (the base's stored one), with remote code, tokenizer and generation config."""
    student.generation_config = base.generation_config
    student.to(torch.device("cpu")).to(dtype).save_pretrained(output)
    tokenizer.save_pretrained(output)


def evaluate_conversion(
    output: Path, base: PreTrainedModel, held: torch.Tensor, recipe: ConversionRecipe, progress: bool
) -> dict:
    """Held-out perplexity of teacher and of the saved student (reloaded from disk), and greedy agreement."""
    saved = LinAttnForCausalLM.from_pretrained(output, dtype=torch.float32).to(base.device).eval()
    teacher_ppl = perplexity(base, held, recipe.seq_len, recipe.batch_size, progress=progress, desc="teacher ppl")
    student_ppl = perplexity(saved, held, recipe.seq_len, recipe.batch_size, progress=progress, desc="student ppl")
    prompts = windows(held, 64)[: recipe.agreement_prompts].to(base.device)
    agreement = greedy_agreement(saved, base, prompts, max_new_tokens=32, progress=progress)
    return {
        "teacher_perplexity": round(teacher_ppl, 4),
        "student_perplexity": round(student_ppl, 4),
        "perplexity_ratio": round(student_ppl / teacher_ppl, 4),
        "heldout_tokens": min(held.numel(), recipe.eval_tokens),
        "greedy_agreement": agreement,
    }
