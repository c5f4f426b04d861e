"""Train the embedded teacher, draft and tokenizer on the Python standard library (run once; results committed).

    python -m hf_linattn.assets.train --output hf_linattn/assets

Writes ``tokenizer/`` (byte-level BPE), ``teacher/`` and ``draft/`` (LlamaForCausalLM, fp16
safetensors, tokenizer included), ``heldout.txt`` and ``training_record.json``: the corpus (file
count, bytes, sha256, Python version), every hyperparameter, the loss curve and held-out
perplexities against a unigram baseline. Weights are committed once; re-running rewrites them.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_linattn.conversion.evaluate import perplexity, unigram_perplexity

from .corpus import DOCUMENT_SEPARATOR, corpus_sha256, heldout_documents, stdlib_root, training_documents

PAD = "<pad>"
TEACHER = dict(hidden_size=256, intermediate_size=640, num_hidden_layers=8, num_attention_heads=8,
               num_key_value_heads=4)  # fmt: skip
DRAFT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=1, num_attention_heads=4,
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
) -> list[float]:
    """AdamW with linear warmup and cosine decay on random ``seq_len`` windows of ``tokens``. Returns losses."""
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
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc)
    for _ in bar:
        starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=gen)
        batch = torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])
        logits = model(input_ids=batch, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(round(loss.item(), 4))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


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
    parser.add_argument("--teacher-steps", type=int, default=900)
    parser.add_argument("--draft-steps", type=int, default=1500)
    parser.add_argument("--teacher-lr", type=float, default=2e-3)
    parser.add_argument("--draft-lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--models", nargs="+", choices=["teacher", "draft"], default=["teacher", "draft"],
                        help="retrain only some; the others' tokenizer and record entries are kept")  # fmt: skip
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    out = args.output
    start = time.time()

    train_docs = list(training_documents())
    held_docs = heldout_documents()
    heldout_text = DOCUMENT_SEPARATOR.join(text for _, text in held_docs)
    (out / "heldout.txt").write_text(heldout_text, encoding="utf-8")
    kept = [m for m in ("teacher", "draft") if m not in args.models and (out / m / "tokenizer.json").is_file()]
    if kept:  # models that stay must keep sharing one tokenizer with the retrained ones
        tokenizer = PreTrainedTokenizerFast.from_pretrained(out / kept[0])
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
        "hyperparameters": {k: v for k, v in vars(args).items() if k != "output"}
        | {"teacher_shape": TEACHER, "draft_shape": DRAFT, "optimizer": "AdamW(0.9, 0.95), wd 0.1, clip 1.0",
           "schedule": f"linear warmup {args.warmup} steps, cosine to 10%"},
    }  # fmt: skip
    for name in kept:
        record[name] = previous[name]
        record[name]["hyperparameters"] = previous[name].get("hyperparameters", previous["hyperparameters"])
    eval_tokens = held_tokens[: args.eval_tokens]
    record["heldout_unigram_perplexity"] = round(
        unigram_perplexity(train_tokens, eval_tokens, len(tokenizer)), 3
    )

    runs = [("teacher", TEACHER, args.teacher_steps, args.teacher_lr),
            ("draft", DRAFT, args.draft_steps, args.draft_lr)]  # fmt: skip
    for name, shape, steps, lr in [run for run in runs if run[0] in args.models]:
        model = build(tokenizer, shape, args.seq_len)
        t0 = time.time()
        losses = train_lm(model, train_tokens, steps, args.batch_size, args.seq_len, lr, args.warmup, args.seed, name)
        model = model.to(torch.float16)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        shipped = LlamaForCausalLM.from_pretrained(out / name, dtype=torch.float32)
        record[name] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(time.time() - t0, 1),
            "train_tokens_seen": steps * args.batch_size * args.seq_len,
            "hyperparameters": dict(steps=steps, lr=lr, warmup=args.warmup, batch_size=args.batch_size,
                                    seq_len=args.seq_len, seed=args.seed, shape=shape),
            "loss_every_50": [*losses[::50], losses[-1]],
            "heldout_perplexity": round(perplexity(shipped, eval_tokens, args.seq_len, progress=True), 3),
        }
        print(name, record[name]["heldout_perplexity"], "unigram", record["heldout_unigram_perplexity"])
    record["total_seconds"] = round(time.time() - start, 1)
    (out / "training_record.json").write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
