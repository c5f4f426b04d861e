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
    PASSKEY_NEW_TOKENS,
    EvalInputError,
    complete_lines,
    completion_prompts,
    exact_match,
    line_completion_report,
    passkey_accuracy,
    passkey_prompts,
)
from hf_linattn.conversion.lm_eval_task import GENERATION_TASK_NAME
from tests.clitools import ENV, run_cli


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: generation is many tiny steps; two threads on a shared 2-core machine spin 20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(TEACHER_DIR, dtype=torch.float32).eval()
    return AutoTokenizer.from_pretrained(TEACHER_DIR), model


def test_selection_is_deterministic_and_split_where_the_tokenizer_splits(teacher):
    tok, _ = teacher
    prompts = completion_prompts(heldout_texts())
    assert prompts == completion_prompts(heldout_texts()) and len(prompts) == COMPLETION_PROMPTS
    assert len({p["context"] for p in prompts}) == len(prompts)
    for p in prompts:
        assert "\n" not in p["target"] and p["target"].strip() and len(tok(p["context"])["input_ids"]) <= 256
        whole = tok(p["context"] + p["target"])["input_ids"]
        assert whole[: len(tok(p["context"])["input_ids"])] == tok(p["context"])["input_ids"], p
    for argv in (["lm-eval-task", "x"], ["eval", "x"], ["convert", "--output", "x"]):  # cli.py stays torch-free
        assert build_parser().parse_args(argv).completion_prompts == COMPLETION_PROMPTS
    with pytest.raises(EvalInputError, match="--completion-prompts 1: the held-out text has only 0"):
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
    report = line_completion_report(model, tok, rigged, teacher=model)
    assert report["same_as_teacher"] == 1.0
    assert report["exact_match"] == report["teacher_exact_match"] == round(expected, 4)


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
    assert len(cases) == 2 * len(PASSKEY_DEPTHS) and all(ids.numel() == 1024 - PASSKEY_NEW_TOKENS for ids, _ in cases)
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
    model_args = f"pretrained={model_dir},trust_remote_code=True,dtype=float32"
    cmd = [str(lm_eval), "--model", "hf", "--model_args", model_args,
           "--include_path", str(tasks), "--tasks", GENERATION_TASK_NAME, "--device", "cpu", "--batch_size", "1",
           "--output_path", str(tmp_path / "results"), "--log_samples"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **ENV}, cwd=tmp_path)
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


def test_convert_reports_line_completion_and_eval_cli_prints_and_writes_the_new_fields(converted, tmp_path, capsys):
    model_dir, report = converted
    lc = report["line_completion"]  # TINY asks for 4 prompts
    assert lc["prompts"] == 4 and set(lc) == {"prompts", "max_new_tokens", "exact_match", "teacher_exact_match",
                                               "same_as_teacher"}  # fmt: skip
    tok = AutoTokenizer.from_pretrained(model_dir)
    student = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=True)
    prompts = completion_prompts(heldout_texts(), 4)
    assert lc["exact_match"] == round(exact_match(complete_lines(student, tok, prompts), prompts), 4)
    assert "line exact match" in (model_dir / "README.md").read_text()

    out = tmp_path / "eval.json"
    run = run_cli("eval", model_dir, "--eval-tokens", "256", "--seq-len", "64", "--agreement-prompts", "1",
                  "--completion-prompts", "3", "--passkey-lengths", "96", "128", "--passkey-trials", "1",
                  "--report", out, "--no-progress", cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    ev = json.loads(out.read_text())
    assert ev["line_completion"]["prompts"] == 3 and "teacher_exact_match" in ev["line_completion"]
    assert set(ev["passkey"]["accuracy"]) == set(ev["passkey"]["teacher_accuracy"]) == {"96", "128"}
    assert ev["passkey"]["trials"] == 1 and ev["passkey"]["depths"] == list(PASSKEY_DEPTHS)
    assert "of 3 held-out code lines (teacher" in run.stdout and "passkey @ 128" in run.stdout

    # bad input: one clear line, before any metric runs
    assert main(["eval", str(model_dir), "--completion-prompts", "100000", "--no-progress",
                 "--report", str(tmp_path / "bad.json")]) == 1  # fmt: skip
    assert "--completion-prompts 100000: the held-out text has only" in capsys.readouterr().err
    assert not (tmp_path / "bad.json").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(model_dir), "--passkey-lengths", "10"])
    assert exit_info.value.code == 2 and "must be >= 64" in capsys.readouterr().err
