"""Generation metrics: line completion equals a hand-written greedy loop and lm_eval's generate_until score;
passkey retrieval passes for a model that can copy the key and fails for one that cannot see it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_linattn.assets import TEACHER_DIR, heldout_texts
from hf_linattn.cli import build_parser, main
from hf_linattn.conversion.data import token_stream
from hf_linattn.conversion.generation_eval import (
    COMPLETION_PROMPTS,
    PASSKEY_DEPTHS,
    EvalInputError,
    complete_lines,
    completion_prompts,
    exact_match,
    line_completion_report,
    passkey_accuracy,
    passkey_prompts,
)
from hf_linattn.conversion.lm_eval_task import GENERATION_TASK_NAME


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: generation is many tiny steps, and two threads on a shared 2-core machine spin 20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return AutoTokenizer.from_pretrained(TEACHER_DIR), AutoModelForCausalLM.from_pretrained(TEACHER_DIR, dtype=torch.float32).eval()


def test_selection_is_deterministic_and_split_where_the_tokenizer_splits(teacher):
    tok, _ = teacher
    prompts = completion_prompts(heldout_texts())
    assert prompts == completion_prompts(heldout_texts()) and len(prompts) == COMPLETION_PROMPTS
    assert len({p["context"] for p in prompts}) == len(prompts)
    for p in prompts:
        assert "\n" not in p["target"] and p["target"].strip() and len(tok(p["context"])["input_ids"]) <= 256
        whole = tok(p["context"] + p["target"])["input_ids"]
        assert whole[: len(tok(p["context"])["input_ids"])] == tok(p["context"])["input_ids"], p
    assert build_parser().parse_args(["lm-eval-task", "x"]).completion_prompts == COMPLETION_PROMPTS
    with pytest.raises(EvalInputError, match="completion prompts asked"):
        completion_prompts(["a = 1\n" * 3], 1)


def _hand_greedy_line(model, tok, context: str, max_new: int = 32) -> str:
    ids = tok(context, return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = model(torch.cat([ids, torch.tensor([new], dtype=torch.long)], 1)).logits[0, -1].argmax().item()
            new.append(nxt)
            if "\n" in tok.decode(new) or nxt == tok.eos_token_id:
                break
    return tok.decode(new, skip_special_tokens=True).split("\n")[0]


def test_line_completion_equals_a_hand_greedy_loop_and_teacher_vs_itself_agrees(teacher):
    tok, model = teacher
    prompts = completion_prompts(heldout_texts(), 6)
    got = complete_lines(model, tok, prompts)
    assert got == [_hand_greedy_line(model, tok, p["context"]) for p in prompts]
    # a prompt whose target is the model's own completion scores 1, the others 0
    rigged = [{**prompts[0], "target": got[0]}, *prompts[1:]]
    expected = (1 + sum(g == p["target"] for g, p in zip(got[1:], prompts[1:]))) / len(prompts)
    assert exact_match(got, rigged) == pytest.approx(expected) and expected > 0
    report = line_completion_report(model, model, tok, rigged)
    assert report["same_as_teacher"] == 1.0
    assert report["student_exact_match"] == report["teacher_exact_match"] == round(expected, 4)


class _CopyStub(torch.nn.Module):
    """Answers the passkey it finds among the last ``window`` prompt tokens, else 00000."""

    def __init__(self, tok, window: int):
        super().__init__()
        self.tok, self.window, self.w = tok, window, torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, max_new_tokens, **kwargs):
        seen = re.search(r"PASSKEY = (\d+)", self.tok.decode(input_ids[0, -self.window :]))
        answer = self.tok(" " + (seen.group(1) if seen else "00000"), return_tensors="pt")["input_ids"]
        return torch.cat([input_ids, answer[:, :max_new_tokens]], 1)


def test_passkey_metric_passes_a_copying_model_and_fails_a_short_sighted_one(teacher):
    tok, _ = teacher
    filler = token_stream(tok, heldout_texts(), 8192)
    cases = passkey_prompts(tok, filler, 1024, trials=2)
    assert len(cases) == 2 * len(PASSKEY_DEPTHS) and all(ids.numel() == 1024 for ids, _ in cases)
    assert len({key for _, key in cases}) == len(cases)  # a fixed answer cannot pass
    assert passkey_accuracy(_CopyStub(tok, 10_000), tok, filler, [256, 1024], trials=2) == {"256": 1.0, "1024": 1.0}
    # sees the last 300 tokens: every depth at 256; at 1024 only the key at depth 0.9 (about 100 tokens from the end)
    short = passkey_accuracy(_CopyStub(tok, 300), tok, filler, [256, 1024], trials=2)
    assert short == {"256": 1.0, "1024": round(1 / len(PASSKEY_DEPTHS), 4)}
    with pytest.raises(EvalInputError, match="--passkey-lengths 8"):
        passkey_prompts(tok, filler, 8, trials=1)


def test_lm_eval_generate_until_exact_match_equals_ours(converted, tmp_path):
    model_dir, _ = converted
    tasks = tmp_path / "tasks"
    assert main(["lm-eval-task", str(tasks), "--max-docs", "1", "--completion-prompts", "8"]) == 0
    prompts = [json.loads(line) for line in (tasks / f"{GENERATION_TASK_NAME}.jsonl").read_text().splitlines()]
    assert prompts == completion_prompts(heldout_texts(), 8)
    lm_eval = Path(sys.executable).parent / "lm_eval"
    cmd = [str(lm_eval), "--model", "hf", "--model_args", f"pretrained={model_dir},trust_remote_code=True,dtype=float32",
           "--include_path", str(tasks), "--tasks", GENERATION_TASK_NAME, "--device", "cpu", "--batch_size", "1",
           "--output_path", str(tmp_path / "results"), "--log_samples"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    (results_file,) = (tmp_path / "results").rglob("results_*.json")
    got = json.loads(results_file.read_text())["results"][GENERATION_TASK_NAME]["exact_match,none"]
    (samples_file,) = (tmp_path / "results").rglob(f"samples_{GENERATION_TASK_NAME}_*.jsonl")
    theirs = [json.loads(line)["filtered_resps"][0] for line in samples_file.read_text().splitlines()]

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=True)
    ours = complete_lines(model, tok, prompts)
    assert sorted(theirs) == sorted(ours)  # lm_eval reorders requests by length
    assert got == pytest.approx(exact_match(ours, prompts))
