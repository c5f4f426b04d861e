"""A converted checkpoint runs under lm-evaluation-harness (``--model hf ... trust_remote_code=True``).

lm_eval's rolling log-likelihood of each document must equal the one computed directly from the
model (every token scored given EOS + the tokens before it), so the harness really ran our model.
The task folder is portable: no absolute path in it, and lm_eval runs it from another directory
after the folder was moved, without warnings about the task's metrics.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_linattn.cli import main
from hf_linattn.conversion.lm_eval_task import TASK_NAME


def test_lm_eval_harness_runs_the_converted_checkpoint(converted, tmp_path):
    model_dir, _ = converted
    written = tmp_path / "written"
    assert main(["lm-eval-task", str(written), "--max-docs", "3", "--max-chars", "600"]) == 0
    for path in written.iterdir():
        assert str(tmp_path) not in path.read_text(), f"{path.name} holds an absolute path"
    tasks = tmp_path / "moved" / "tasks"
    shutil.move(written, tasks)
    docs = [json.loads(line)["text"] for line in (tasks / f"{TASK_NAME}.jsonl").read_text().splitlines()]
    assert len(docs) == 3
    lm_eval = Path(sys.executable).parent / "lm_eval"
    model_args = f"pretrained={model_dir},trust_remote_code=True,dtype=float32"
    cmd = [str(lm_eval), "--model", "hf", "--model_args", model_args,
           "--include_path", "../moved/tasks", "--tasks", TASK_NAME, "--device", "cpu", "--batch_size", "1",
           "--output_path", str(tmp_path / "results")]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    (tmp_path / "elsewhere").mkdir()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path / "elsewhere")
    assert result.returncode == 0, result.stderr[-4000:]
    task_warnings = [line for line in result.stderr.splitlines()
                     if "WARNING" in line and ("aggregation" in line or "higher_is_better" in line)]  # fmt: skip
    assert task_warnings == []
    (results_file,) = (tmp_path / "results").rglob("results_*.json")
    got = json.loads(results_file.read_text())["results"][TASK_NAME]["bits_per_byte,none"]

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total_ll, total_bytes = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor([[tok.eos_token_id, *tok(doc, add_special_tokens=False)["input_ids"]]])
            logp = model(ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])
            total_ll += logp.sum().item()
            total_bytes += len(doc.encode("utf-8"))
    expected = -total_ll / total_bytes / math.log(2)
    assert got == pytest.approx(expected, rel=1e-3)
