"""The command line itself: fast help without torch, defaults and help text everywhere, one-line errors."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from hf_linattn import commands
from hf_linattn.cli import LAYER_TYPES, build_parser, main
from tests.clitools import ENV, assert_one_line_error, run_cli

COMMANDS = ["convert", "eval", "export", "push", "push-lookahead", "lm-eval-task", "demo", "bench"]

# Runs the CLI, then reports which heavy modules it imported
_PROBE = """
import sys
from hf_linattn.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(sorted(m for m in ("torch", "transformers", "hf_linattn.modeling", "hf_linattn.conversion") if m in sys.modules))
"""


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


ARGV = [
    ["--help"],
    ["convert", "--help"],
    ["eval", "--help"],
    ["bench", "mqar", "--help"],
    ["convert", "--keep-softmax", "-1", "--output", "x"],
    ["bench", "mqar", "--dims", "0"],
]


@pytest.mark.parametrize("argv", ARGV)
def test_help_and_argument_errors_load_no_torch(argv, tmp_path):
    result = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env={**os.environ, **ENV})  # fmt: skip
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout[-2000:]


def test_help_lists_every_command_in_plain_text(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for name in COMMANDS:
        assert f"\n    {name}" in result.stdout, name
    assert "``" not in result.stdout and ":func:" not in result.stdout  # no reST markup
    assert set(_subparsers(build_parser())) == set(COMMANDS)


def test_every_option_has_help_and_defaults_are_shown():
    for name, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
    convert_help = _subparsers(build_parser())["convert"].format_help()
    for shown in ("(default: 200)", "(default: 4000000)", "(default: rdn)", "(default: 0.3)", "(default: cosine)",
                  "(default: 25)", "(default: embedded-teacher)", "(default: kl)", "(default: all)",
                  "(default: 0.003)"):  # fmt: skip
        assert shown in " ".join(convert_help.split()), shown


def test_convert_defaults_are_the_recipe_defaults():
    # one source per fact: a default changed in ConversionRecipe but not in the parser (or back) fails here
    from hf_linattn.commands import recipe_from_args
    from hf_linattn.conversion.pipeline import ConversionRecipe

    assert recipe_from_args(build_parser().parse_args(["convert", "--output", "out"])) == ConversionRecipe()


def test_layer_type_names_match_the_models():
    from hf_linattn.modeling import LAYER_TYPES as MODEL_LAYER_TYPES

    assert tuple(LAYER_TYPES) == tuple(MODEL_LAYER_TYPES)


def test_negative_keep_softmax_names_the_flag(tmp_path):
    result = run_cli("convert", "--output", "out", "--keep-softmax", "-1", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "hf-linattn convert: error: argument --keep-softmax: must be >= 0, got -1"
    )
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["convert", "eval"])
def test_zero_agreement_prompts_is_refused_before_any_work(command, tmp_path):
    # greedy agreement over no prompts is 0/0: refused by the parser, not a ZeroDivisionError after training
    args = ["--output", "out"] if command == "convert" else ["model"]
    result = run_cli(command, *args, "--agreement-prompts", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith("argument --agreement-prompts: must be >= 1, got 0")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("base", ["nope-folder", "./nope", "../nope/model"])
def test_missing_local_base_is_a_missing_folder_not_a_hub_id(base, tmp_path):
    result = run_cli("convert", base, "--output", "out", cwd=tmp_path)
    assert result.returncode == 1
    assert_one_line_error(result.stderr, f"base checkpoint {base}: no such local folder")
    assert not any(tmp_path.iterdir())


def test_eval_window_longer_than_the_held_out_tokens_is_one_line(tmp_path):
    from hf_linattn.assets import TEACHER_DIR

    result = run_cli("eval", TEACHER_DIR, "--eval-tokens", "100", "--seq-len", "512", "--no-progress", cwd=tmp_path)
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "100 held-out tokens", "--seq-len 512")
    assert not any(tmp_path.iterdir())


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "convert", "nope-folder", "--output", "out", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "MissingCheckpointFileError: base checkpoint nope-folder: no such local folder" in result.stderr
    # --debug is also accepted after the command
    after = run_cli("convert", "nope-folder", "--output", "out", "--debug", cwd=tmp_path)
    assert "Traceback (most recent call last)" in after.stderr


def test_unexpected_error_is_one_line_with_a_debug_hint(monkeypatch, capsys, tmp_path):
    def broken(args):
        raise RuntimeError("boom\nsecond line of a long message")

    monkeypatch.setattr(commands, "lm_eval_task", broken)
    assert main(["lm-eval-task", str(tmp_path)]) == 1
    assert_one_line_error(capsys.readouterr().err, "unexpected RuntimeError: boom", "rerun with --debug")
    with pytest.raises(RuntimeError, match="boom"):
        main(["--debug", "lm-eval-task", str(tmp_path)])


def test_interrupt_is_one_line_with_status_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "convert", interrupted)
    assert main(["convert", "--output", "out"]) == 130
    assert_one_line_error(capsys.readouterr().err, "interrupted; rerun the same command to resume")
