"""Decode speed and cache memory of a converted checkpoint against its teacher (``hf-linattn export --bench``).

A short, honest measurement for the model card, not the full sweep of ``benchmarks/bench_decoding.py``: for each
context length, greedy ``generate()`` from a random prompt of that length, timed with 1 and with ``1 + new_tokens``
new tokens (the difference is the decode time of ``new_tokens`` tokens, prefill excluded), and the bytes of every
tensor the returned cache holds after the prompt and the new tokens. Both models run in float32 on the CPU unless a
GPU is visible, one after the other on the same prompts; the report records the device, threads and dtype.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

BENCH_NAME = "decode_benchmark.json"
DEFAULT_CONTEXTS = (256, 1024)


def _tensor_bytes(obj: Any, seen: set[int] | None = None, depth: int = 0) -> int:
    """Bytes of the distinct tensors reachable from ``obj`` (a cache: lists, dicts and object attributes)."""
    import torch

    seen = set() if seen is None else seen
    if depth > 6 or id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        items = vars(obj).values()
    else:
        return 0
    return sum(_tensor_bytes(item, seen, depth + 1) for item in items)


def _decode(model: Any, ids: Any, new_tokens: int) -> tuple[float, int]:
    """(seconds per decoded token, cache bytes after ``ids`` and ``1 + new_tokens`` tokens) of greedy generate()."""
    import torch

    def run(n: int) -> tuple[float, Any]:
        kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None,
                      return_dict_in_generate=True, attention_mask=torch.ones_like(ids))  # fmt: skip
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, **kwargs)
        return time.perf_counter() - started, out

    run(1)  # warm-up
    prefill, _ = run(1)
    total, out = run(1 + new_tokens)
    cache = out["cache"] if "cache" in out else out.get("past_key_values")  # transformers >= 5.24 names it cache
    return max(total - prefill, 1e-9) / new_tokens, _tensor_bytes(cache)


def measure_decoding(
    student_dir: str | Path,
    teacher: str | Path,
    *,
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS,
    new_tokens: int = 32,
    seed: int = 0,
) -> dict:
    """Decode tokens/s and cache bytes of the checkpoint in ``student_dir`` and of ``teacher`` (folder or Hub id).

    Returns {"device", "dtype", "threads", "new_tokens", "rows": [{"context", "student_tokens_per_s",
    "teacher_tokens_per_s", "student_cache_bytes", "teacher_cache_bytes"}, ...], ...}.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from hf_linattn.modeling import LinAttnForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    student = LinAttnForCausalLM.from_pretrained(student_dir, dtype=torch.float32).to(device).eval()
    base = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).to(device).eval()
    vocab = min(student.config.vocab_size, base.config.vocab_size)
    rows = []
    for context in contexts:
        gen = torch.Generator().manual_seed(seed + context)
        ids = torch.randint(3, vocab, (1, context), generator=gen).to(device)
        s_time, s_bytes = _decode(student, ids, new_tokens)
        t_time, t_bytes = _decode(base, ids, new_tokens)
        rows.append({
            "context": context, "student_tokens_per_s": round(1 / s_time, 1),
            "teacher_tokens_per_s": round(1 / t_time, 1), "student_cache_bytes": s_bytes,
            "teacher_cache_bytes": t_bytes,
        })  # fmt: skip
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "device": f"{device.type} ({name})", "dtype": "float32", "threads": torch.get_num_threads(),
        "new_tokens": new_tokens, "teacher": str(teacher), "rows": rows,
        "method": "greedy generate() from a random prompt; decode time = time(1 + n new tokens) - time(1 new token)",
    }  # fmt: skip


__all__ = ["BENCH_NAME", "DEFAULT_CONTEXTS", "measure_decoding"]
