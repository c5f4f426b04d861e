"""The whole conversion: load, stage 1, layer selection, stage 2, save, evaluate, report; resumable.

``convert`` is what ``hf-linattn convert`` runs. It builds the output in ``OUTPUT.partial/`` and
renames it to ``OUTPUT`` when everything is written (``output.py`` decides what may be replaced).
The resumable state lives in ``OUTPUT.partial/.conversion/``:

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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from safetensors import safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hf_linattn.errors import InputError
from hf_linattn.fileio import atomic_write_json, read_json_state
from hf_linattn.modeling import LINEAR_LAYER_TYPES, LinAttnForCausalLM

from .attention_transfer import ATTENTION_TRANSFER_PARAMS, attention_transfer, layer_errors, stage1_parameters
from .checkpoint import StageCheckpoint, atomic_save, reading_state
from .data import DataError, batch_for_step, check_training_tokens, read_text_sources, token_stream
from .evaluate import greedy_agreement, perplexity, windows
from .generation_eval import COMPLETION_PROMPTS, completion_prompts, line_completion_report
from .loading import load_base, resolve_source
from .lora import LOSSES, lora_recover
from .output import REPORT_NAME, WORK_DIR, RecipeMismatchError, finalize, plan_output, prepare_build
from .selection import (
    SELECTIONS,
    evenly_spaced_layers,
    hybrid_layer_types,
    kl_guided_scores,
    select_by_score,
    select_softmax_layers,
)
from .training import LR_SCHEDULES
from .transfer import GATE_INITS, init_gates_from_keys, linearize

EMBEDDED_TEACHER = "embedded-teacher"


class RecipeError(InputError, ValueError):
    """A recipe setting is out of range; the message names the command-line flag."""


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


@dataclass
class ConversionRecipe:
    """Everything that determines a conversion's result (saved in the report and the model card)."""

    base: str = EMBEDDED_TEACHER
    tokenizer: str | None = None
    mode: str = "rdn"
    keep_softmax: int = 0
    keep_softmax_layers: list[int] | None = None
    softmax_selection: str = "error"
    selection_steps: int = 20
    attention_transfer_steps: int = 200
    attention_transfer_lr: float = 3e-1  # peaks of lr_schedule: measured best (docs/benchmarks.md, section 13)
    attention_transfer_params: str = "all"  # measured best (docs/benchmarks.md, section 13)
    attention_transfer_weights_lr: float = 3e-3  # peak for the copied q/k/v/o when they train in stage 1
    lora_steps: int = 200
    lora_lr: float = 1e-2
    lora_rank: int = 8
    lora_alpha: int = 16
    lr_schedule: str = "cosine"
    lora_mlp: bool = False
    train_mixers: bool = False
    gate_init: str = "random"
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
    completion_prompts: int = COMPLETION_PROMPTS
    checkpoint_every: int = 25

    def check(self) -> None:
        """Raise RecipeError (naming the flag) for a setting out of range."""
        if self.mode not in LINEAR_LAYER_TYPES:
            raise RecipeError(f"--mode {self.mode!r}: expected one of {', '.join(LINEAR_LAYER_TYPES)}")
        if self.loss not in LOSSES:
            raise RecipeError(f"--loss {self.loss!r}: expected one of {', '.join(LOSSES)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise RecipeError(f"--lr-schedule {self.lr_schedule!r}: expected one of {', '.join(LR_SCHEDULES)}")
        if self.attention_transfer_params not in ATTENTION_TRANSFER_PARAMS:
            choices = ", ".join(ATTENTION_TRANSFER_PARAMS)
            value = self.attention_transfer_params
            raise RecipeError(f"--attention-transfer-params {value!r}: expected one of {choices}")
        if self.gate_init not in GATE_INITS:
            raise RecipeError(f"--gate-init {self.gate_init!r}: expected one of {', '.join(GATE_INITS)}")
        if self.softmax_selection not in SELECTIONS:
            choices = ", ".join(SELECTIONS)
            raise RecipeError(f"--softmax-selection {self.softmax_selection!r}: expected one of {choices}")
        if self.keep_softmax and self.keep_softmax_layers is not None:
            raise RecipeError("give --keep-softmax N or --keep-softmax-layers i,j, not both")
        for name in ("attention_transfer_steps", "lora_steps", "keep_softmax", "completion_prompts",
                     "selection_steps"):  # fmt: skip
            if getattr(self, name) < 0:
                raise RecipeError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "seq_len", "checkpoint_every", "eval_tokens", "max_train_tokens", "lora_rank",
                     "agreement_prompts"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise RecipeError(f"{_flag(name)} must be > 0, got {getattr(self, name)}")
        if self.eval_tokens < self.seq_len:
            raise RecipeError(f"--eval-tokens {self.eval_tokens} must be at least --seq-len {self.seq_len}")
        for name in ("attention_transfer_lr", "attention_transfer_weights_lr", "lora_lr", "residual_clip"):
            if not getattr(self, name) > 0:
                raise RecipeError(f"{_flag(name)} must be > 0, got {getattr(self, name)}")

    def resolved(self) -> ConversionRecipe:
        """A copy whose paths resolve from any directory: local paths made absolute, Hub ids as given.

        A local-looking base or tokenizer that does not exist is refused here, before any work.
        """
        base = self.base if self.base == EMBEDDED_TEACHER else resolve_source(self.base, "base checkpoint")
        tokenizer = resolve_source(self.tokenizer, "--tokenizer") if self.tokenizer else None
        return dataclasses.replace(
            self, base=base, tokenizer=tokenizer, data=[_text_source(p, "--data") for p in self.data],
            eval_data=[_text_source(p, "--eval-data") for p in self.eval_data],
        )  # fmt: skip

    def local_inputs(self) -> list[tuple[str, Path]]:
        """(label, path) of every local file or folder the run reads: the output must hold none of them."""
        inputs = [("base checkpoint", self.base), ("--tokenizer folder", self.tokenizer)]
        inputs += [("--data source", p) for p in self.data] + [("--eval-data source", p) for p in self.eval_data]
        return [(label, Path(p)) for label, p in inputs if p and p != EMBEDDED_TEACHER and Path(p).exists()]


def _text_source(path: str, flag: str) -> str:
    local = Path(path).expanduser()
    if not local.exists():
        raise DataError(f"{flag} {path}: no such file or folder")
    return str(local.resolve())


def _embedded(base: str) -> Path | None:
    from hf_linattn.assets import TEACHER_DIR

    return TEACHER_DIR if base == EMBEDDED_TEACHER else None


def resolve_base(base: str) -> str:
    """The path or hub id to load for a recipe's ``base`` ("embedded-teacher" is the shipped teacher)."""
    return str(_embedded(base) or base)


def train_and_eval_tokens(
    recipe: ConversionRecipe, tokenizer: PreTrainedTokenizerBase, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, str]]]:
    """Training stream (``--data``, else the stdlib corpus), held-out stream (``--eval-data``, else heldout.txt)
    and the held-out line-completion prompts (selected here, so too few lines are refused before training)."""
    from hf_linattn.assets import heldout_texts, training_texts

    train_texts = [t for _, t in read_text_sources(recipe.data)] if recipe.data else training_texts()
    eval_texts = [t for _, t in read_text_sources(recipe.eval_data, "--eval-data")] if recipe.eval_data else None
    eval_texts = eval_texts or heldout_texts()
    lines = completion_prompts(eval_texts, recipe.completion_prompts) if recipe.completion_prompts else []
    train = token_stream(tokenizer, train_texts, recipe.max_train_tokens, progress, "tokenizing training text")
    held = token_stream(tokenizer, eval_texts, recipe.eval_tokens, progress, "tokenizing held-out")
    return train, held, lines


def _stage1_piece_names(model: LinAttnForCausalLM, train: str) -> list[str]:
    """Names of the linear layers' parameters that stage 1 trains (conv, gates, norms; more with ``train``)."""
    return [
        f"model.layers.{i}.self_attn.{name}"
        for i in linear_layer_indices(model)
        for name in stage1_parameters(model.model.layers[i].self_attn, train)
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
        with reading_state(done), safe_open(str(done), framework="pt") as f:
            meta = f.metadata()
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(meta["errors"]), json.loads(meta["losses"])  # noqa: SIM118
    n = base.config.num_hidden_layers
    torch.manual_seed(recipe.seed)
    model = linearize(base, [recipe.mode] * n, **_config_overrides(recipe))
    if recipe.gate_init == "keys":
        init_gates_from_keys(model)
    model = model.to(accelerator.device)
    batches = [batch_for_step(train, s, recipe.batch_size, recipe.seq_len, recipe.seed)
               for s in range(recipe.attention_transfer_steps)]  # fmt: skip
    losses = []
    if batches:
        checkpoint = StageCheckpoint(work / "stage1.safetensors", recipe.checkpoint_every)
        losses = attention_transfer(base, model, batches, recipe.attention_transfer_steps, recipe.attention_transfer_lr,
                                    progress, accelerator, checkpoint, schedule=recipe.lr_schedule,
                                    train=recipe.attention_transfer_params,
                                    weights_lr=recipe.attention_transfer_weights_lr)  # fmt: skip
    probe = windows(held, recipe.seq_len)[: max(1, recipe.batch_size)].to(accelerator.device)
    errors = layer_errors(base, model, probe)
    per_layer = [round(errors[i], 6) for i in range(n)]
    params = dict(model.named_parameters())
    names = _stage1_piece_names(model, recipe.attention_transfer_params)
    pieces = {name: params[name].detach().cpu() for name in names}
    if accelerator.is_main_process:
        atomic_save(pieces, done, {"errors": json.dumps(per_layer), "losses": json.dumps(losses)})
    accelerator.wait_for_everyone()
    return pieces, per_layer, losses


def build_student(
    base: PreTrainedModel, recipe: ConversionRecipe, pieces: dict[str, torch.Tensor], kept: list[int]
) -> LinAttnForCausalLM:
    """The hybrid with softmax layers ``kept``, linear layers carrying their stage-1 ``pieces``, on base's device."""
    student = linearize(base, hybrid_layer_types(base.config, recipe.mode, kept), **_config_overrides(recipe))
    mine = set(_stage1_piece_names(student, recipe.attention_transfer_params))
    student.load_state_dict({k: v for k, v in pieces.items() if k in mine}, strict=False)
    return student.to(base.device)


def choose_softmax_layers(
    base: PreTrainedModel,
    recipe: ConversionRecipe,
    pieces: dict[str, torch.Tensor],
    errors: list[float],
    train: torch.Tensor,
    work: Path,
    main: bool,
    progress: bool,
) -> tuple[list[int], dict]:
    """The softmax layers to keep, and how they were chosen: ``{"strategy": ..., "scores": {layer: score}}``.

    KL-guided scores are saved in ``work/selection.json`` so that a resumed run does not redo them.
    """
    if recipe.keep_softmax_layers is not None:
        return sorted(recipe.keep_softmax_layers), {"strategy": "named"}
    n = len(errors)
    if recipe.softmax_selection == "even":
        return evenly_spaced_layers(n, recipe.keep_softmax), {"strategy": "even"}
    if recipe.softmax_selection == "error" or not recipe.keep_softmax:
        scores = dict(enumerate(errors))
        return select_softmax_layers(scores, recipe.keep_softmax), {"strategy": "error", "scores": scores}
    saved = work / "selection.json"
    if saved.exists():
        scores = {int(i): v for i, v in read_json_state(saved, "pass --restart to convert again").items()}
    else:
        torch.manual_seed(recipe.seed + 2)
        batches = [batch_for_step(train, s, recipe.batch_size, recipe.seq_len, recipe.seed + 2)
                   for s in range(recipe.selection_steps)]  # fmt: skip
        probe = batch_for_step(train, 0, recipe.batch_size, recipe.seq_len, recipe.seed + 3).to(base.device)
        scores = kl_guided_scores(base, lambda kept: build_student(base, recipe, pieces, kept), batches, probe,
                                  lr=recipe.lora_lr, progress=progress)  # fmt: skip
        if main:
            atomic_write_json(saved, scores)
    return select_by_score(scores, recipe.keep_softmax), {"strategy": "kl", "scores": scores}


def _say(progress: bool, text: str) -> None:
    """A phase message on stderr (silenced with the bars by --no-progress)."""
    if progress:
        print(f"hf-linattn: {text}", file=sys.stderr, flush=True)


def convert(
    output: Path,
    recipe: ConversionRecipe,
    restart: bool = False,
    overwrite: bool = False,
    accelerator: Accelerator | None = None,
    progress: bool = True,
) -> dict:
    """Run (or resume) a conversion into ``output``; returns the report (also written as conversion_report.json).

    restart: discard an unfinished run (``output.partial``) and replace a finished one at the end.
    overwrite: allow replacing an ``output`` folder that holds something other than a conversion.
    Nothing in ``output`` changes before the new checkpoint is complete. Other processes of a
    multi-process run return an empty dict.
    """
    recipe = recipe.resolved()
    recipe.check()
    mine = dataclasses.asdict(recipe)
    # Not every mode uses every gate (gla has no beta), so DDP must tolerate parameters without gradients.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])
    main = accelerator.is_main_process
    progress = progress and main
    plan = plan_output(output, mine, recipe.local_inputs(), restart=restart, overwrite=overwrite)
    if plan.action == "done":
        if main:
            print(f"hf-linattn: {plan.target} already holds this conversion; nothing to do "
                  "(pass --restart to run it again)", file=sys.stderr)  # fmt: skip
        return _read_report(plan.target) if main else {}
    if plan.action == "finalize":  # an earlier run wrote everything and stopped before the rename
        accelerator.wait_for_everyone()
        if main:
            _say(progress, f"finishing the interrupted run in {plan.build}")
            finalize(plan, mine)
        accelerator.wait_for_everyone()
        return _read_report(plan.target) if main else {}
    started = time.time()
    build, work = plan.build, plan.work
    _say(progress, f"loading {recipe.base}")
    base, tokenizer, stored_dtype = load_base(resolve_base(recipe.base), recipe.tokenizer)
    base.to(accelerator.device)
    n = base.config.num_hidden_layers
    bad = [i for i in recipe.keep_softmax_layers or [] if not 0 <= i < n]
    if bad:
        raise RecipeError(f"--keep-softmax-layers: layer indices {bad} are out of range for the base's {n} layers")
    if recipe.keep_softmax > n:
        raise RecipeError(f"--keep-softmax {recipe.keep_softmax} exceeds the base model's {n} layers")
    if recipe.batch_size % accelerator.num_processes:
        raise RecipeError(f"--batch-size {recipe.batch_size} does not split over {accelerator.num_processes} processes")
    train, held, lines = train_and_eval_tokens(recipe, tokenizer, progress)
    check_training_tokens(train, recipe.seq_len)
    if held.numel() < recipe.seq_len:
        count = held.numel()
        raise DataError(f"the held-out text has {count} tokens: less than one window of --seq-len {recipe.seq_len}")
    # Every input is checked: only now does anything get written. Every process has read the
    # folders (plan_output) before the main one changes them.
    accelerator.wait_for_everyone()
    if main:
        prepare_build(plan, mine)
    accelerator.wait_for_everyone()
    if plan.action == "resume":
        _say(progress, f"resuming the unfinished conversion in {build}")

    pieces, errors, stage1_losses = run_stage1(base, recipe, train, held, work, accelerator, progress)
    kept, selection = choose_softmax_layers(base, recipe, pieces, errors, train, work, main, progress)
    layer_types = hybrid_layer_types(base.config, recipe.mode, kept)

    torch.manual_seed(recipe.seed + 1)
    student = build_student(base, recipe, pieces, kept)
    stage2_losses: list[float] = []
    if recipe.lora_steps and any(t in LINEAR_LAYER_TYPES for t in layer_types):
        batches = [batch_for_step(train, s, recipe.batch_size, recipe.seq_len, recipe.seed + 1)
                   for s in range(recipe.lora_steps)]  # fmt: skip
        student, stage2_losses = lora_recover(
            student, batches, recipe.lora_steps, teacher=base, loss=recipe.loss, lr=recipe.lora_lr,
            rank=recipe.lora_rank, alpha=recipe.lora_alpha, include_mlp=recipe.lora_mlp,
            train_mixers=recipe.train_mixers, adapter_dir=build / "lora_adapter", progress=progress,
            accelerator=accelerator,
            checkpoint=StageCheckpoint(work / "stage2.safetensors", recipe.checkpoint_every),
            schedule=recipe.lr_schedule,
        )  # fmt: skip
    report: dict = {}
    if main:
        _say(progress, f"saving the checkpoint into {build}")
        save_student(student, base, tokenizer, build, stored_dtype)
        report = evaluate_conversion(build, base, tokenizer, held, lines, recipe, progress)
        report.update(
            recipe=mine,
            base_model_type=base.config.model_type,
            num_layers=n,
            layer_types=layer_types,
            kept_softmax_layers=kept,
            softmax_selection=selection,
            stage1_layer_errors=errors,
            stage1_losses=stage1_losses,
            stage2_losses=stage2_losses,
            train_tokens_seen={
                "attention_transfer": recipe.attention_transfer_steps * recipe.batch_size * recipe.seq_len,
                "lora": recipe.lora_steps * recipe.batch_size * recipe.seq_len,
            },
            num_processes=accelerator.num_processes,
            device=accelerator.device.type,  # where it trained: "cuda" whenever a GPU is visible
            seconds=round(time.time() - started, 1),
        )
        atomic_write_json(build / REPORT_NAME, report)
        from hf_linattn.hub_cards import write_model_card

        write_model_card(build, report)
        finalize(plan, mine)
        _say(progress, f"done: {plan.target}")
    accelerator.wait_for_everyone()
    return report


def _read_report(folder: Path) -> dict:
    return read_json_state(folder / REPORT_NAME, "pass --restart to convert again")


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
    output: Path,
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    held: torch.Tensor,
    lines: list[dict[str, str]],
    recipe: ConversionRecipe,
    progress: bool,
) -> dict:
    """Held-out perplexity of teacher and of the saved student (reloaded from disk), greedy agreement and line
    completion. Passkey retrieval is left to ``hf-linattn eval --passkey-lengths``: seconds per length
    and model, near zero on the embedded models, so not worth every conversion's time.
    """
    saved = LinAttnForCausalLM.from_pretrained(output, dtype=torch.float32).to(base.device).eval()
    teacher_ppl = perplexity(base, held, recipe.seq_len, recipe.batch_size, progress=progress, desc="teacher ppl")
    student_ppl = perplexity(saved, held, recipe.seq_len, recipe.batch_size, progress=progress, desc="student ppl")
    prompts = windows(held, 64)[: recipe.agreement_prompts].to(base.device)
    agreement = greedy_agreement(saved, base, prompts, max_new_tokens=32, progress=progress)
    extra = {}
    if lines:
        extra["line_completion"] = line_completion_report(saved, tokenizer, lines, teacher=base, progress=progress)
    return {
        "teacher_perplexity": round(teacher_ppl, 4),
        "student_perplexity": round(student_ppl, 4),
        "perplexity_ratio": round(student_ppl / teacher_ppl, 4),
        "heldout_tokens": min(held.numel(), recipe.eval_tokens),
        "greedy_agreement": agreement,
        **extra,
    }


__all__ = [
    "EMBEDDED_TEACHER",
    "REPORT_NAME",
    "WORK_DIR",
    "ConversionRecipe",
    "RecipeError",
    "RecipeMismatchError",
    "convert",
    "resolve_base",
]
