"""The README's main job until conversion exists: build a tiny hybrid, generate, save, reload as remote code.

The reload runs in a fresh Python process where ``import hf_linattn`` is impossible, which is
exactly what a user of a pushed checkpoint has.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .modeling import LinAttnConfig, LinAttnForCausalLM

DEFAULT_LAYER_TYPES = ["rdn", "rdn", "rdn", "full_attention", "rla", "gdn", "gla", "sliding_attention"]

_REMOTE_GENERATE = textwrap.dedent(
    """
    import sys
    sys.modules["hf_linattn"] = None  # the package must not be needed
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    checkpoint, io_file, max_new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ids = load_file(io_file)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
    save_file({"greedy": out}, io_file)
    print(type(model).__module__)
    """
)


def generate_without_package(
    checkpoint: Path, input_ids: torch.Tensor, max_new_tokens: int
) -> tuple[torch.Tensor, str]:
    """Greedy-generate from ``checkpoint`` in a fresh process that cannot import hf_linattn.

    Returns the generated ids [B, T + max_new_tokens] and the module the model class came from.
    """
    io_file = checkpoint / "_remote_io.safetensors"
    save_file({"input_ids": input_ids.contiguous()}, io_file)
    try:
        result = subprocess.run(
            [sys.executable, "-c", _REMOTE_GENERATE, str(checkpoint), str(io_file), str(max_new_tokens)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"loading {checkpoint} as remote code failed:\n{result.stderr[-4000:]}")
        return load_file(io_file)["greedy"], result.stdout.strip().splitlines()[-1]
    finally:
        io_file.unlink(missing_ok=True)


def run_demo(
    output: Path,
    layer_types: list[str] = DEFAULT_LAYER_TYPES,
    prompt_length: int = 48,
    max_new_tokens: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Build, generate, save, reload without the package; write ``demo_report.json`` into ``output``."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    report: dict = {"layer_types": layer_types, "seed": seed}
    steps = tqdm(total=4, desc="demo", unit="step", disable=not progress)

    config = LinAttnConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
        layer_types=layer_types, sliding_window=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = LinAttnForCausalLM(config).eval()
    report["parameters"] = sum(p.numel() for p in model.parameters())
    steps.update()

    prompt = torch.randint(3, config.vocab_size, (1, prompt_length))
    start = time.perf_counter()
    with torch.no_grad():
        greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=0, eos_token_id=None)  # fmt: skip
        uncached = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=False)  # fmt: skip
    report["generate_seconds"] = round(time.perf_counter() - start, 3)
    report["cached_equals_uncached"] = bool(torch.equal(greedy, uncached))
    steps.update()

    checkpoint = output / "checkpoint"
    model.save_pretrained(checkpoint)
    report["checkpoint"] = str(checkpoint.resolve())  # resolves from any directory
    report["remote_code_files"] = sorted(p.name for p in checkpoint.glob("*.py"))
    steps.update()

    remote, module = generate_without_package(checkpoint, prompt, max_new_tokens)
    report["remote_module"] = module
    report["remote_equals_local"] = bool(torch.equal(remote, greedy))
    report["generated_ids"] = greedy[0, prompt_length:].tolist()
    steps.update()
    steps.close()

    report["ok"] = report["cached_equals_uncached"] and report["remote_equals_local"]
    (output / "demo_report.json").write_text(json.dumps(report, indent=2))
    return report
