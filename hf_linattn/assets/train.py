"""Train the embedded teacher, draft and tokenizer on the Python standard library (run once; results committed).

    python -m hf_linattn.assets.train --output hf_linattn/assets

Writes ``teacher/`` and ``draft/`` (LlamaForCausalLM, fp16 safetensors, tokenizer included),
``heldout.txt`` and ``training_record.json``: the corpus (file count, bytes, sha256, Python
version), every hyperparameter, the loss curve, the held-out perplexity curve, and held-out
perplexities against a unigram baseline and a 2-layer baseline trained in the same run. The draft
is distilled from the teacher (KL to its next-token distribution), so it drafts what the teacher
would say; its top-1 agreement with the teacher is recorded. The byte-level BPE tokenizer is
trained only when the output has none (or with ``--new-tokenizer``), so held-out token counts stay
comparable across retrainings. Weights are committed once; re-running rewrites them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_linattn.conversion.checkpoint import StageCheckpoint
from hf_linattn.conversion.evaluate import perplexity, unigram_perplexity

from .corpus import DOCUMENT_SEPARATOR, corpus_sha256, heldout_documents, stdlib_root, training_documents

PAD = "<pad>"
# 8 layers (a hybrid keeps 1 softmax layer in 4) at the width a 2-core CPU can train on ~20M tokens in an
# hour: held-out perplexity is bound by tokens seen at this budget, and hidden 192 trains twice as many as 256.
TEACHER = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=8, num_attention_heads=6,
               num_key_value_heads=3)  # fmt: skip
DRAFT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2)  # fmt: skip
# the 2-layer reference the teacher must clearly beat (trained in the same run, not shipped)
BASELINE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)  # fmt: skip


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE: every byte sequence encodes, so any Python source round-trips."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[DOCUMENT_SEPARATOR, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=DOCUMENT_SEPARATOR, eos_token=DOCUMENT_SEPARATOR, pad_token=PAD,
        model_max_length=2048,
    )  # fmt: skip


def encode_documents(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """One stream [N]: each document followed by the separator token."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def train_lm(
    model: LlamaForCausalLM,
    tokens: torch.Tensor,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    warmup: int,
    seed: int,
    desc: str,
    teacher: LlamaForCausalLM | None = None,
    eval_tokens: torch.Tensor | None = None,
    eval_every: int = 0,
    checkpoint: StageCheckpoint | None = None,
) -> tuple[list[float], list[list[float]], float]:
    """AdamW with linear warmup and cosine decay on random ``seq_len`` windows of ``tokens`` [N].

    With ``teacher`` the loss is KL(teacher || model) on the same windows (distillation), else
    next-token cross-entropy. Every ``eval_every`` steps (and at the end) the held-out perplexity on
    ``eval_tokens`` is recorded. With ``checkpoint`` the run saves its whole state every
    ``checkpoint.every`` steps (safetensors, plus the curve in a JSON sidecar) and a rerun resumes it
    exactly: the batch sampler and the schedule are replayed to the saved step. Returns the per-step
    losses, the ``[step, perplexity]`` curve and the training seconds over all resumed segments.
    """
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95)
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))),
    )
    params = dict(model.named_parameters())
    start, losses = checkpoint.restore(params, optimizer) if checkpoint else (0, [])
    sidecar = checkpoint.path.with_suffix(".json") if checkpoint else None
    saved = json.loads(sidecar.read_text()) if start and sidecar.is_file() else {}
    curve: list[list[float]] = [c for c in saved.get("curve", []) if c[0] <= start]
    seconds = saved.get("seconds", 0.0) if start else 0.0
    with warnings.catch_warnings():  # replaying the schedule warns that no optimizer step came first
        warnings.simplefilter("ignore")
        for _ in range(start):
            torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=gen)
            schedule.step()
    model.train()
    t0 = time.time()
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps)
    for step in bar:
        due = eval_tokens is not None and eval_every and step and step % eval_every == 0
        if due and (not curve or curve[-1][0] < step):  # a resumed run may have this point already
            curve.append([step, round(perplexity(model, eval_tokens, seq_len), 3)])
            model.train()
            bar.set_description(f"{desc} (held-out ppl {curve[-1][1]:.2f})")
        starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=gen)
        batch = torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])
        logits = model(input_ids=batch, use_cache=False).logits
        if teacher is None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        else:
            with torch.no_grad():
                target = teacher(input_ids=batch, use_cache=False).logits.float().log_softmax(-1)
            loss = F.kl_div(logits.float().log_softmax(-1).flatten(0, 1), target.flatten(0, 1),
                            log_target=True, reduction="batchmean")  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(round(loss.item(), 4))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if checkpoint and ((step + 1) % checkpoint.every == 0 or step + 1 == steps):
            checkpoint.save(step + 1, params, optimizer, losses)
            elapsed = seconds + time.time() - t0
            tmp = sidecar.with_name(sidecar.name + ".tmp")
            tmp.write_text(json.dumps({"step": step + 1, "curve": curve, "seconds": round(elapsed, 1)}))
            os.replace(tmp, sidecar)
    model.eval()
    if eval_tokens is not None and not (curve and curve[-1][0] == steps):
        curve.append([steps, round(perplexity(model, eval_tokens, seq_len), 3)])
    return losses, curve, round(seconds + time.time() - t0, 1)


@torch.no_grad()
def top1_agreement(model: LlamaForCausalLM, teacher: LlamaForCausalLM, tokens: torch.Tensor, seq_len: int) -> float:
    """Fraction of positions of ``tokens`` [N] (``seq_len`` windows) where both models' argmax agree."""
    rows = tokens[: tokens.numel() // seq_len * seq_len].view(-1, seq_len)
    same = sum((model(input_ids=r[None]).logits.argmax(-1) == teacher(input_ids=r[None]).logits.argmax(-1)).sum().item()
               for r in rows)  # fmt: skip
    return same / rows.numel()


def build(tokenizer: PreTrainedTokenizerFast, shape: dict, seq_len: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **shape,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--teacher-steps", type=int, default=3600)
    parser.add_argument("--draft-steps", type=int, default=1500)
    parser.add_argument("--baseline-steps", type=int, default=1500, help="2-layer reference; 0 skips it")
    parser.add_argument("--teacher-lr", type=float, default=3e-3)
    parser.add_argument("--draft-lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--eval-every", type=int, default=300, help="held-out curve interval (on 16K tokens)")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="resumable training state (default: OUTPUT/.train_state); rerun to resume")  # fmt: skip
    parser.add_argument("--checkpoint-every", type=int, default=100, help="save the training state every N steps")
    parser.add_argument("--new-tokenizer", action="store_true", help="train a new tokenizer even if OUTPUT has one")
    parser.add_argument("--models", nargs="+", choices=["teacher", "draft"], default=["teacher", "draft"],
                        help="retrain only some; the others' record entries are kept")  # fmt: skip
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    out = args.output
    state_dir = args.state_dir or out / ".train_state"
    start = time.time()

    train_docs = list(training_documents())
    held_docs = heldout_documents()
    heldout_text = DOCUMENT_SEPARATOR.join(text for _, text in held_docs)
    (out / "heldout.txt").write_text(heldout_text, encoding="utf-8")
    kept = [m for m in ("teacher", "draft") if m not in args.models and (out / m / "tokenizer.json").is_file()]
    existing = [m for m in ("teacher", "draft") if (out / m / "tokenizer.json").is_file()]
    if kept or (existing and not args.new_tokenizer):  # one tokenizer for all; reuse keeps token counts comparable
        tokenizer = PreTrainedTokenizerFast.from_pretrained(out / existing[0])
    else:
        tokenizer = train_tokenizer([t for _, t in train_docs], args.vocab_size)
    train_tokens = encode_documents(tokenizer, [t for _, t in train_docs])
    held_tokens = encode_documents(tokenizer, [t for _, t in held_docs])

    previous = json.loads((out / "training_record.json").read_text()) if kept else {}
    record: dict = {
        "command": " ".join([Path(sys.executable).name, "-m", "hf_linattn.assets.train", *(argv or sys.argv[1:])]),
        "corpus": {
            "source": "Python standard library source (.py), tests/idlelib/lib2to3/site-packages excluded",
            "python": platform.python_version(), "stdlib_root": str(stdlib_root()),
            "train_files": len(train_docs), "train_bytes": sum(len(t.encode()) for _, t in train_docs),
            "train_sha256": corpus_sha256(train_docs), "train_tokens": train_tokens.numel(),
            "heldout_files": [rel for rel, _ in held_docs], "heldout_bytes": len(heldout_text.encode()),
            "heldout_sha256": corpus_sha256(held_docs), "heldout_tokens": held_tokens.numel(),
        },
        "hyperparameters": {k: v for k, v in vars(args).items() if k not in ("output", "state_dir", "checkpoint_every")}
        | {"teacher_shape": TEACHER, "draft_shape": DRAFT, "baseline_shape": BASELINE,
           "optimizer": "AdamW(0.9, 0.95), wd 0.1, clip 1.0", "draft_loss": "KL to the teacher",
           "schedule": f"linear warmup {args.warmup} steps, cosine to 10%"},
    }  # fmt: skip
    for name in kept:
        record[name] = previous[name]
        record[name]["hyperparameters"] = previous[name].get("hyperparameters", previous["hyperparameters"])
    eval_tokens = held_tokens[: args.eval_tokens]
    record["heldout_unigram_perplexity"] = round(unigram_perplexity(train_tokens, eval_tokens, len(tokenizer)), 3)

    curve_tokens = eval_tokens[:16384]
    teacher = None
    runs = [("teacher", TEACHER, args.teacher_steps, args.teacher_lr),
            ("draft", DRAFT, args.draft_steps, args.draft_lr),
            ("baseline_2_layers", BASELINE, args.baseline_steps, args.draft_lr)]  # fmt: skip
    for name, shape, steps, lr in runs:
        if name == "draft" and "draft" in args.models:
            teacher = teacher or LlamaForCausalLM.from_pretrained(out / "teacher", dtype=torch.float32).eval()
        elif name not in args.models and not (name.startswith("baseline") and steps):
            continue
        model = build(tokenizer, shape, args.seq_len)
        # one state file per model and schedule: changing any of them starts afresh instead of resuming
        setup = json.dumps([shape, steps, lr, args.warmup, args.batch_size, args.seq_len, args.seed])
        key = hashlib.sha256(setup.encode()).hexdigest()[:10]
        checkpoint = StageCheckpoint(state_dir / f"{name}-{key}.safetensors", args.checkpoint_every)
        losses, curve, seconds = train_lm(
            model, train_tokens, steps, args.batch_size, args.seq_len, lr, args.warmup, args.seed, name,
            teacher=teacher if name == "draft" else None, eval_tokens=curve_tokens, eval_every=args.eval_every,
            checkpoint=checkpoint,
        )  # fmt: skip
        entry = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": seconds,
            "train_tokens_seen": steps * args.batch_size * args.seq_len,
            "hyperparameters": dict(steps=steps, lr=lr, warmup=args.warmup, batch_size=args.batch_size,
                                    seq_len=args.seq_len, seed=args.seed, shape=shape),
            "loss_every_50": [*losses[::50], losses[-1]],
            "heldout_curve_16k": curve,
        }  # fmt: skip
        if name.startswith("baseline"):  # measured for the record, not shipped
            entry["heldout_perplexity"] = round(perplexity(model, eval_tokens, args.seq_len), 3)
        else:
            model = model.to(torch.float16)
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.save_pretrained(out / name)
            tokenizer.save_pretrained(out / name)
            shipped = LlamaForCausalLM.from_pretrained(out / name, dtype=torch.float32)
            entry["heldout_perplexity"] = round(perplexity(shipped, eval_tokens, args.seq_len, progress=True), 3)
            if name == "draft":
                entry["top1_agreement_with_teacher"] = round(
                    top1_agreement(shipped, teacher, eval_tokens, args.seq_len), 4
                )
        record[name] = entry
        print(name, entry["heldout_perplexity"], "unigram", record["heldout_unigram_perplexity"], flush=True)
    record["total_seconds"] = round(time.time() - start, 1)
    (out / "training_record.json").write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
