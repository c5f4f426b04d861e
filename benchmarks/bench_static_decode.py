"""Decode ms/token of the static-shape path, eager and compiled, beside the default (dynamic-cache) path.

Model: the README's student shape (the embedded teacher's backbone: hidden 256, 8 layers, GQA 8/4 heads,
vocab 4096) with 6 rdn layers and 2 full_attention layers (layers 1 and 3 kept softmax), random init, and
the embedded Llama teacher itself for reference. After a prefill of ``--context`` tokens, one decode
step (one new token) is timed for:

- ``dynamic``: the default LinAttnCache, eager forward (what generate() runs by default);
- ``static``: LinAttnStaticCache, eager forward;
- ``static+compile``: LinAttnStaticCache, ``torch.compile(model.forward)`` (inductor; on CUDA
  ``--mode reduce-overhead`` adds CUDA graphs);
- ``llama``: the embedded teacher (transformers' LlamaForCausalLM, sdpa, DynamicCache), eager.

Every step really advances its cache (the context grows by the same number of tokens for all), and
all are timed round-robin in one run. Prints ms/token (wall and thread CPU time) and the ratios.

    python benchmarks/bench_static_decode.py --threads 1     # ~2 min on a 2-core CPU (compilation included)
    python benchmarks/bench_static_decode.py --quick
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, describe, format_table, progress, setup, time_interleaved, write_report

from hf_linattn import LinAttnCache, LinAttnConfig, LinAttnForCausalLM
from hf_linattn.assets import TEACHER_DIR
from hf_linattn.modeling import LinAttnStaticCache
from hf_linattn.modeling.modeling_linattn import OUTPUT_CACHE_FIELD

NAME = "bench_static_decode"
GOAL = 0.6  # compiled static decode / eager decode, at most (issue 10)


def student_config(teacher_config) -> LinAttnConfig:
    mixers = ["rdn"] * teacher_config.num_hidden_layers
    mixers[1] = mixers[3] = "full_attention"
    return LinAttnConfig(
        vocab_size=teacher_config.vocab_size, hidden_size=teacher_config.hidden_size,
        intermediate_size=teacher_config.intermediate_size, num_attention_heads=teacher_config.num_attention_heads,
        num_key_value_heads=teacher_config.num_key_value_heads, head_dim=teacher_config.head_dim,
        mixer_types=mixers, tie_word_embeddings=True, residual_clip=1.0,
    )  # fmt: skip


def stepper(model, cache, first_position: int, device, compiled=None):
    """A callable that runs one decode step on ``cache`` (the same token id each time: speed only)."""
    forward = compiled or model.forward
    token = torch.tensor([[17]], device=device)
    state = {"position": first_position}

    def step():
        positions = torch.tensor([[state["position"]]], device=device)
        forward(input_ids=token, cache=cache, position_ids=positions, use_cache=True)
        state["position"] += 1

    return step


def main() -> None:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=256, help="prefill length before the timed steps")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--mode", default=None, help="torch.compile mode (default; 'reduce-overhead' on CUDA)")
    args = parser.parse_args()
    machine = setup(args)
    repeats = args.repeats or (3 if args.quick else 30)
    context = 16 if args.quick else args.context
    device = torch.device(args.device)

    teacher = AutoModelForCausalLM.from_pretrained(TEACHER_DIR, dtype=torch.float32).to(device).eval()
    student = LinAttnForCausalLM(student_config(teacher.config)).to(device).eval()
    steps_per_variant = 2 * (args.warmup + repeats) + 8
    prompt = torch.randint(3, teacher.config.vocab_size, (1, context), device=device)
    fns = {}
    with torch.inference_mode():
        dynamic = LinAttnCache(student.config)
        student(prompt, cache=dynamic)
        fns["dynamic"] = stepper(student, dynamic, context, device)
        static = LinAttnStaticCache(student.config, max_cache_len=context + steps_per_variant)
        student(prompt, cache=static)
        fns["static"] = stepper(student, static, context, device)
        compiled_cache = LinAttnStaticCache(student.config, max_cache_len=context + steps_per_variant)
        student(prompt, cache=compiled_cache)
        mode = args.mode or ("reduce-overhead" if device.type == "cuda" else None)
        compiled = torch.compile(student.forward, mode=mode, fullgraph=True, dynamic=False)
        fns["static+compile"] = stepper(student, compiled_cache, context, device, compiled=compiled)
        llama_cache = getattr(teacher(prompt, use_cache=True), OUTPUT_CACHE_FIELD)
        fns["llama"] = stepper(teacher, llama_cache, context, device)
        for _ in range(3):  # compile (and CUDA graph capture) before timing
            fns["static+compile"]()

    bar = progress(len(fns) * 2 * (args.warmup + repeats), "decode steps", disable=args.no_progress)
    cpu: dict[str, list[float]] = {}
    wall = time_interleaved(fns, repeats=repeats, warmup=args.warmup, bar=bar, cpu_times=cpu)
    bar.close()
    ms = {name: 1e3 * statistics.median(t) for name, t in wall.items()}
    cpu_ms = {name: 1e3 * statistics.median(t) for name, t in cpu.items()}
    rows = [[name, ms[name], cpu_ms[name], ms[name] / ms["dynamic"], cpu_ms[name] / cpu_ms["dynamic"]] for name in fns]
    print(f"\n{describe(machine)}; context {context} tokens, {repeats} timed steps each")
    print(format_table(["path", "ms/token (wall)", "ms/token (CPU)", "/ dynamic (wall)", "/ dynamic (CPU)"], rows))
    ratio = cpu_ms["static+compile"] / cpu_ms["dynamic"]
    verdict = "met" if ratio <= GOAL else "not met"
    print(f"\ncompiled static / dynamic (CPU time): {ratio:.2f} (goal <= {GOAL}: {verdict})")
    write_report(NAME, args, machine, {"ms_per_token_wall": ms, "ms_per_token_cpu": cpu_ms,
                                       "context": context, "repeats": repeats})  # fmt: skip


if __name__ == "__main__":
    main()
