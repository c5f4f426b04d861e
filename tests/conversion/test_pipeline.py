"""``hf-linattn convert`` / ``eval`` end to end on the embedded teacher: report, card, remote code, resume, errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from hf_linattn.assets import TEACHER_DIR
from hf_linattn.cli import main
from hf_linattn.conversion import UnsupportedBaseModelError
from hf_linattn.conversion.loading import MissingCheckpointFileError, TokenizerMismatchError
from hf_linattn.conversion.pipeline import RecipeMismatchError
from hf_linattn.demo import generate_without_package

from .conftest import TINY, convert_cli


def test_report_holds_the_contract_fields(converted):
    out, report = converted
    errors = report["stage1_layer_errors"]
    assert len(errors) == report["num_layers"] == 8
    assert all(0 < e < 10 for e in errors)
    # the two kept layers are the two with the highest stage-1 error
    assert report["kept_softmax_layers"] == sorted(sorted(range(8), key=lambda i: -errors[i])[:2])
    for i, kind in enumerate(report["layer_types"]):
        assert (kind == "full_attention") == (i in report["kept_softmax_layers"])
    assert math.isfinite(report["teacher_perplexity"]) and report["teacher_perplexity"] > 1
    assert math.isfinite(report["student_perplexity"]) and report["student_perplexity"] > 1
    assert report["recipe"]["mode"] == "rdn" and report["recipe"]["lora_rank"] == 8
    assert len(report["stage1_losses"]) == 4 and len(report["stage2_losses"]) == 4
    assert (out / "lora_adapter" / "adapter_config.json").is_file()
    card = (out / "README.md").read_text()
    assert f"{report['student_perplexity']:.3f}" in card and "trust_remote_code=True" in card
    assert "library_name: transformers" in card


def test_checkpoint_loads_without_the_package_and_generates_the_same(converted):
    out, _ = converted
    ids = torch.tensor([[5, 17, 240, 33, 9, 71]])
    local = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = local.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                             pad_token_id=0, eos_token_id=None)  # fmt: skip
    remote, module = generate_without_package(out, ids, 10)
    assert not module.startswith("hf_linattn")
    assert torch.equal(remote, ref)


def test_eval_cli_reproduces_the_reported_perplexities(converted, tmp_path):
    out, report = converted
    path = tmp_path / "eval.json"
    assert main(["eval", str(out), "--eval-tokens", "2048", "--seq-len", "64", "--batch-size", "2",
                 "--agreement-prompts", "2", "--completion-prompts", "4", "--report", str(path),
                 "--no-progress"]) == 0  # fmt: skip
    ev = json.loads(path.read_text())
    assert ev["teacher"] == str(TEACHER_DIR)  # taken from the conversion report
    assert ev["perplexity"] == pytest.approx(report["student_perplexity"], rel=1e-5)
    assert ev["teacher_perplexity"] == pytest.approx(report["teacher_perplexity"], rel=1e-5)
    assert ev["greedy_agreement"] == report["greedy_agreement"]
    assert ev["line_completion"] == report["line_completion"]  # same 4 prompts (conftest TINY)


def test_explicit_softmax_layers_and_recipe_mismatch_keeps_the_run(tmp_path):
    out = tmp_path / "explicit"
    report = convert_cli(out, "--keep-softmax-layers", "0,3", "--lora-steps", "0")
    assert report["kept_softmax_layers"] == [0, 3]
    assert report["layer_types"][0] == report["layer_types"][3] == "full_attention"
    assert report["stage2_losses"] == []
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(RecipeMismatchError, match="finished conversion with another recipe"):
        main(["--debug", "convert", "--output", str(out), "--mode", "gdn", *TINY])
    assert (out / "model.safetensors").read_bytes() == before


def _interrupted_run(out: Path, kill_when: str) -> None:
    """Start a conversion in a subprocess and kill -9 it once ``kill_when`` holds a mid-stage state."""
    cmd = [sys.executable, "-m", "hf_linattn.cli", "convert", "--output", str(out), "--mode", "rdn",
           "--keep-softmax", "2", *TINY, "--attention-transfer-steps", "12", "--lora-steps", "12"]  # fmt: skip
    # the resumed half runs in this process: the same thread count keeps float reductions in the same order
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    state = out.with_name(out.name + ".partial") / ".conversion" / kill_when
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if state.exists():
                with safe_open(str(state), framework="pt") as f:
                    step = int(f.metadata()["step"])
                if 2 <= step < 12:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "conversion_report.json").exists()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    convert_cli(out, "--keep-softmax", "2", "--attention-transfer-steps", "12", "--lora-steps", "12")
    return out


@pytest.mark.parametrize("kill_when", ["stage1.safetensors", "stage2.safetensors"])
def test_kill9_then_resume_gives_the_uninterrupted_result(tmp_path, uninterrupted, kill_when):
    out = tmp_path / "resumed"
    _interrupted_run(out, kill_when)
    report = convert_cli(out, "--keep-softmax", "2", "--attention-transfer-steps", "12", "--lora-steps", "12")
    ref = json.loads((uninterrupted / "conversion_report.json").read_text())
    for key in ("stage1_layer_errors", "kept_softmax_layers", "stage1_losses", "stage2_losses"):
        assert report[key] == pytest.approx(ref[key], rel=1e-5), key
    assert report["student_perplexity"] == pytest.approx(ref["student_perplexity"], rel=1e-5)
    got, want = load_file(out / "model.safetensors"), load_file(uninterrupted / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-5, msg=name)


# ---- bad input: one clear error each, nothing half-written (the one-line messages: test_cli_outputs.py) ----


def test_missing_base_folder(tmp_path):
    with pytest.raises(MissingCheckpointFileError, match="no such local folder"):
        main(["--debug", "convert", str(tmp_path / "nope"), "--output", str(tmp_path / "out"), *TINY])


def test_pickle_only_checkpoint_is_refused(tmp_path):
    base = tmp_path / "pickled"
    base.mkdir()
    (base / "config.json").write_text((TEACHER_DIR / "config.json").read_text())
    (base / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(MissingCheckpointFileError, match=r"pytorch_model\.bin.*never loaded"):
        main(["--debug", "convert", str(base), "--output", str(tmp_path / "out"), *TINY])
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(base)
    with pytest.raises(UnsupportedBaseModelError, match="llama, qwen2, qwen3"):
        main(["--debug", "convert", str(base), "--output", str(tmp_path / "out"), *TINY])


def test_tokenizer_that_does_not_fit_the_model_is_refused(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TEACHER_DIR)
    tok.add_tokens([f"<extra_{i}>" for i in range(10)])
    tok.save_pretrained(tmp_path / "tok")
    with pytest.raises(TokenizerMismatchError, match="does not belong to this model"):
        main(["--debug", "convert", "--tokenizer", str(tmp_path / "tok"), "--output", str(tmp_path / "out"), *TINY])


def test_eval_refuses_a_teacher_with_another_tokenizer(converted, tmp_path):
    out, _ = converted
    from transformers import AutoTokenizer

    teacher = tmp_path / "teacher"
    AutoModelForCausalLM.from_pretrained(TEACHER_DIR).save_pretrained(teacher)
    tok = AutoTokenizer.from_pretrained(TEACHER_DIR)
    tok.add_tokens(["<other>"])
    tok.save_pretrained(teacher)
    with pytest.raises(TokenizerMismatchError, match="tokenizers differ"):
        main(["--debug", "eval", str(out), "--teacher", str(teacher), "--eval-tokens", "256", "--seq-len", "64",
              "--no-progress"])  # fmt: skip


def test_bad_layer_indices_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        main(["--debug", "convert", "--output", str(tmp_path / "out"), "--keep-softmax-layers", "3,8", *TINY])
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
