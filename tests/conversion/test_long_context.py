"""``hf-linattn bench long-context``: tail perplexity and passkey vs length, teacher beside a converted student."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_linattn.assets import TEACHER_DIR, heldout_texts
from hf_linattn.cli import main
from hf_linattn.conversion.data import token_stream
from hf_linattn.conversion.loading import load_tokenizer
from hf_linattn.evaluation.long_context import tail_perplexity


def test_tail_perplexity_is_the_loss_of_the_last_quarter():
    teacher = AutoModelForCausalLM.from_pretrained(TEACHER_DIR, dtype=torch.float32).eval()
    tokens = token_stream(load_tokenizer(str(TEACHER_DIR), ""), heldout_texts(), 256)
    labels = tokens[:128].clone()
    labels[: 128 - 128 // 4] = -100  # transformers' own shifted loss over the last 32 targets
    with torch.no_grad():
        expected = math.exp(teacher(input_ids=tokens[None, :128], labels=labels[None]).loss.item())
    assert tail_perplexity(teacher, tokens, 128, windows=1) == pytest.approx(expected, rel=1e-4)


def test_cli_reports_every_model_and_length(converted, tmp_path, capsys):
    out, _ = converted
    json_path = tmp_path / "lc.json"
    assert main(["bench", "long-context", "embedded-teacher", str(out), "--lengths", "64", "128", "--windows", "1",
                 "--passkey-trials", "1", "--no-progress", "--output", str(json_path)]) == 0  # fmt: skip
    report = json.loads(json_path.read_text())
    assert report["lengths"] == [64, 128] and list(report["models"]) == ["embedded-teacher", str(out)]
    for r in report["models"].values():
        assert set(r["perplexity"]) == set(r["passkey"]) == {"64", "128"}
        assert all(math.isfinite(v) and v > 1 for v in r["perplexity"].values())
        assert all(0 <= v <= 1 for v in r["passkey"].values())
    student, teacher = report["models"][str(out)], report["models"]["embedded-teacher"]
    assert student["perplexity"] != teacher["perplexity"]
    assert json_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| model | ppl @ 64 | ppl @ 128 | passkey @ 64 | passkey @ 128 |" in capsys.readouterr().out
