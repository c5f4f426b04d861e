"""A checkpoint saved under one end of the supported transformers window loads and generates the same greedy
tokens under the other end, in a process where hf_linattn cannot be imported; both directions.

The other end's interpreter comes from HF_LINATTN_OTHER_PYTHON (an environment with hf_linattn installed and
the other transformers release). `.ci/run` runs this file in the oldest-transformers environment with the
newest environment as the other end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from hf_linattn.assets import TEACHER_DIR

from .test_remote_code import LOAD_WITHOUT_PACKAGE
from .tiny import HYBRID, prompt, tiny_model

OTHER_PYTHON = os.environ.get("HF_LINATTN_OTHER_PYTHON")
pytestmark = pytest.mark.skipif(
    not OTHER_PYTHON, reason="HF_LINATTN_OTHER_PYTHON names the other end's python (.ci/run sets it)"
)

# Saves a tiny hybrid with its tokenizer under the running transformers, and its greedy continuation.
SAVE = textwrap.dedent(
    """
    import sys
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer
    from hf_linattn import LinAttnConfig, LinAttnForCausalLM
    from hf_linattn.assets import TEACHER_DIR

    checkpoint, io_file = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    config = LinAttnConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                           num_key_value_heads=2, mixer_types=["rdn", "sliding_attention", "gla", "full_attention"],
                           sliding_window=5, residual_clip=0.5, linear_use_rotary=True, qk_norm=True)
    model = LinAttnForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.weight") or name.endswith("embed_tokens.weight"):
                p.normal_(0, 0.3)
    model.save_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(TEACHER_DIR).save_pretrained(checkpoint)
    ids = load_file(io_file)["input_ids"]
    with torch.no_grad():
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
        logits = model(ids).logits
    save_file({"input_ids": ids, "logits": logits, "greedy": greedy}, io_file)
    """
)


def run(python: str, code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(cwd / "modules")}  # fmt: skip
    return subprocess.run([python, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def other_version() -> str:
    version = run(OTHER_PYTHON, "import transformers; print(transformers.__version__)", cwd=Path.cwd())
    assert version.returncode == 0, version.stderr[-2000:]
    assert version.stdout.strip() != transformers.__version__, "the two ends must be different transformers releases"
    return version.stdout.strip()


def test_saved_here_loads_and_generates_the_same_at_the_other_end(tmp_path):
    other_version()
    model = tiny_model(HYBRID, linear_use_rotary=True, qk_norm=True)
    checkpoint = tmp_path / "ckpt"
    model.save_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(TEACHER_DIR)
    tokenizer.save_pretrained(checkpoint)
    ids = prompt(1, 30, seed=80)
    io_file = tmp_path / "io.safetensors"
    save_file({"input_ids": ids}, io_file)
    result = run(OTHER_PYTHON, LOAD_WITHOUT_PACKAGE, str(checkpoint), str(io_file), str(tokenizer.vocab_size),
                 cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    remote = load_file(io_file)
    with torch.no_grad():
        logits = model(ids).logits
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                pad_token_id=0, eos_token_id=None)  # fmt: skip
    torch.testing.assert_close(remote["logits"], logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(remote["greedy"], greedy)


def test_saved_at_the_other_end_loads_and_generates_the_same_here(tmp_path):
    version = other_version()
    checkpoint, io_file = tmp_path / "ckpt", tmp_path / "io.safetensors"
    save_file({"input_ids": prompt(1, 30, seed=81)}, io_file)
    saved = run(OTHER_PYTHON, SAVE, str(checkpoint), str(io_file), cwd=tmp_path)
    assert saved.returncode == 0, saved.stderr[-3000:]
    assert f'"transformers_version": "{version}"' in (checkpoint / "config.json").read_text()
    want = load_file(io_file)
    vocab = str(AutoTokenizer.from_pretrained(TEACHER_DIR).vocab_size)
    loaded = run(sys.executable, LOAD_WITHOUT_PACKAGE, str(checkpoint), str(io_file), vocab, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    got = load_file(io_file)
    torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-5, atol=1e-5)
    assert torch.equal(got["greedy"], want["greedy"])
