"""``hf-linattn convert`` / ``eval`` through the installed command, as a user runs them on their own files.

Each refusal: exit status 1, one line on stderr that says what is wrong and the fix, and not one
byte of the user's folders changed (hashed before and after), no ``.partial`` folder left.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from hf_linattn.assets import TEACHER_DIR
from tests.clitools import assert_one_line_error, run_cli, snapshot

from .conftest import TINY

QUIET = TINY  # TINY ends with --no-progress
LOUD = [flag for flag in TINY if flag != "--no-progress"]


def _teacher_copy(path: Path) -> Path:
    shutil.copytree(TEACHER_DIR, path)
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """(workdir, OUTPUT): a finished conversion of a copy of the teacher, named relatively from ``workdir``."""
    work = tmp_path_factory.mktemp("finished")
    _teacher_copy(work / "base")
    result = run_cli("convert", "base", "--output", "out", *QUIET, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""  # --no-progress: no bar, no phase message, no library warning
    assert "student perplexity" in result.stdout
    return work, work / "out"


def _copy_run(finished: tuple[Path, Path], dest: Path) -> Path:
    shutil.copytree(finished[1], dest, symlinks=True)
    return dest


def test_reports_store_paths_that_resolve_from_anywhere(finished, tmp_path):
    work, out = finished
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["recipe"]["base"] == str((work / "base").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    model = _copy_run(finished, tmp_path / "model")
    relative = Path("..") / "model"
    result = run_cli("eval", relative, "--eval-tokens", "256", "--seq-len", "64", "--agreement-prompts", "1",
                     "--completion-prompts", "1", "--no-progress", cwd=elsewhere)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ev = json.loads((model / "eval_report.json").read_text())
    assert ev["teacher"] == str((work / "base").resolve())  # read from the conversion report
    assert ev["model"] == str(model.resolve())
    assert "greedy_agreement" in ev


def test_output_that_is_or_holds_the_base_is_refused_even_with_overwrite(tmp_path):
    base = _teacher_copy(tmp_path / "models" / "llama")
    before = snapshot(tmp_path)
    for output, extra, verb in [(base, [], "is the base"), (base, ["--overwrite"], "is the base"),
                                (tmp_path / "models", ["--overwrite"], "holds the base")]:  # fmt: skip
        result = run_cli("convert", base, "--output", output, *QUIET, *extra, cwd=tmp_path)
        assert result.returncode == 1
        assert_one_line_error(result.stderr, verb, "never writes over its inputs")
        assert snapshot(tmp_path) == before


def test_foreign_output_is_refused_then_replaced_only_with_overwrite(tmp_path):
    foreign = _teacher_copy(tmp_path / "llama")  # an unrelated checkpoint, plus the user's notes
    (foreign / "NOTES.txt").write_text("my notes")
    before = snapshot(tmp_path)
    result = run_cli("convert", "--output", foreign, *QUIET, cwd=tmp_path)
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "holds no hf-linattn conversion", "NOTES.txt", "--overwrite")
    assert snapshot(tmp_path) == before

    result = run_cli("convert", "--output", foreign, "--overwrite", *LOUD, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (foreign / "NOTES.txt").exists()  # --overwrite replaces the folder's whole content
    assert json.loads((foreign / "config.json").read_text())["model_type"] == "hf_linattn"
    assert not (tmp_path / "llama.partial").exists()
    # progress: a message or a bar for every phase, tokenizing the corpus included
    for phase in ("hf-linattn: loading embedded-teacher", "Loading weights", "tokenizing training text",
                  "attention transfer", "LoRA recovery", "hf-linattn: saving the checkpoint", "student ppl",
                  "greedy agreement", "hf-linattn: done"):  # fmt: skip
        assert phase in result.stderr, phase


def test_finished_run_with_another_recipe_then_restart_clears_every_file(finished, tmp_path):
    out = _copy_run(finished, tmp_path / "out")
    base = str((finished[0] / "base").resolve())
    (out / "eval_report.json").write_text('{"perplexity": 1.0}')
    before = snapshot(tmp_path)

    same = run_cli("convert", base, "--output", out, *QUIET, cwd=tmp_path)
    assert same.returncode == 0 and "already holds this conversion" in same.stderr
    assert snapshot(tmp_path) == before

    other = run_cli("convert", base, "--output", out, *QUIET, "--mode", "gdn", cwd=tmp_path)
    assert other.returncode == 1
    line = assert_one_line_error(other.stderr, "holds a finished conversion with another recipe",
                                 "mode: 'rdn' then, 'gdn' now", "--restart")  # fmt: skip
    assert "unfinished" not in line
    assert snapshot(tmp_path) == before

    restarted = run_cli("convert", base, "--output", out, *QUIET, "--mode", "gdn", "--restart", cwd=tmp_path)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert not (out / "eval_report.json").exists()  # the old run's files are gone, not left beside the new model
    assert json.loads((out / "conversion_report.json").read_text())["recipe"]["mode"] == "gdn"
    assert not (tmp_path / "out.partial").exists()


def test_damaged_state_files_name_the_file_and_the_fix(finished, tmp_path):
    base = str((finished[0] / "base").resolve())
    recipe = (finished[1] / ".conversion" / "recipe.json").read_text()
    partial = tmp_path / "out.partial" / ".conversion"
    partial.mkdir(parents=True)

    (partial / "recipe.json").write_text(recipe[: len(recipe) // 2])  # truncated
    before = snapshot(tmp_path)
    result = run_cli("convert", base, "--output", tmp_path / "out", *QUIET, cwd=tmp_path)
    assert result.returncode == 1
    assert_one_line_error(result.stderr, f"{partial / 'recipe.json'} is damaged", "pass --restart")
    assert snapshot(tmp_path) == before

    (partial / "recipe.json").write_text(recipe)
    (partial / "stage1.safetensors").write_bytes((TEACHER_DIR / "model.safetensors").read_bytes()[:4096])
    before = snapshot(tmp_path)
    result = run_cli("convert", base, "--output", tmp_path / "out", *QUIET, cwd=tmp_path)
    assert result.returncode == 1
    assert_one_line_error(result.stderr, f"{partial / 'stage1.safetensors'} is damaged", "pass --restart")
    assert snapshot(tmp_path) == before

    done = _copy_run(finished, tmp_path / "done")
    (done / ".conversion" / "manifest.json").write_text("{")
    shutil.rmtree(tmp_path / "out.partial")
    before = snapshot(tmp_path)
    result = run_cli("convert", base, "--output", done, *QUIET, cwd=tmp_path)
    assert result.returncode == 1
    assert_one_line_error(result.stderr, f"{done / '.conversion' / 'manifest.json'} is damaged", "--restart")
    assert snapshot(tmp_path) == before


def test_checkpoint_missing_a_tensor_is_refused_by_name(tmp_path):
    base = _teacher_copy(tmp_path / "base")
    tensors = load_file(base / "model.safetensors")
    del tensors["model.layers.3.self_attn.k_proj.weight"]
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    before = snapshot(tmp_path)
    result = run_cli("convert", "base", "--output", "out", *QUIET, cwd=tmp_path)
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "lack 1 tensor(s)", "model.layers.3.self_attn.k_proj.weight")
    assert snapshot(tmp_path) == before


def test_folder_without_tokenizer_points_to_the_tokenizer_flag(tmp_path):
    base = tmp_path / "weights-only"
    base.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(TEACHER_DIR / name, base / name)
    before = snapshot(tmp_path)
    result = run_cli("convert", base, "--output", "out", *QUIET, cwd=tmp_path)
    assert result.returncode == 1
    line = assert_one_line_error(result.stderr, "no tokenizer files", "pass --tokenizer")
    assert "sentencepiece" not in line.lower() and "tiktoken" not in line.lower()
    assert snapshot(tmp_path) == before
