"""A checkpoint saved under one end of the supported transformers window loads and generates the same greedy
tokens under the other end, in a process where hf_linattn cannot be imported.

The other end's interpreter comes from HF_LINATTN_OTHER_PYTHON: `.ci/run` builds both environments (the
newest transformers and the oldest supported one) and runs this test in each, so both directions are proven.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from hf_linattn.assets import TEACHER_DIR

from .test_remote_code import LOAD_WITHOUT_PACKAGE
from .tiny import HYBRID, prompt, tiny_model

OTHER_PYTHON = os.environ.get("HF_LINATTN_OTHER_PYTHON")


@pytest.mark.skipif(not OTHER_PYTHON, reason="HF_LINATTN_OTHER_PYTHON names the other end's python (.ci/run sets it)")
def test_checkpoint_round_trip_to_the_other_end_of_the_window(tmp_path):
    other = subprocess.run([OTHER_PYTHON, "-c", "import transformers; print(transformers.__version__)"],
                           capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert other != transformers.__version__, "the two ends must be different transformers releases"

    model = tiny_model(HYBRID, linear_use_rotary=True, qk_norm=True)
    checkpoint = tmp_path / "ckpt"
    model.save_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(TEACHER_DIR)
    tokenizer.save_pretrained(checkpoint)
    ids = prompt(1, 30, seed=80)
    io_file = tmp_path / "io.safetensors"
    save_file({"input_ids": ids}, io_file)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}  # fmt: skip
    result = subprocess.run([OTHER_PYTHON, "-c", LOAD_WITHOUT_PACKAGE, str(checkpoint), str(io_file),
                             str(tokenizer.vocab_size)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    remote = load_file(io_file)
    with torch.no_grad():
        logits = model(ids).logits
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                pad_token_id=0, eos_token_id=None)  # fmt: skip
    torch.testing.assert_close(remote["logits"], logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(remote["greedy"], greedy), (transformers.__version__, other)
