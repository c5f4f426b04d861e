"""The README's two commands and the CLI they run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_linattn.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_command = [line for line in (REPO / ".ci/run").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert len(ci_command) == 1
    assert ci_command[0] in (REPO / "README.md").read_text()


def test_demo_generates_saves_and_reloads_without_the_package(tmp_path, capsys):
    argv = ["demo", "--output", str(tmp_path), "--max-new-tokens", "12", "--layer-types", "rdn,full_attention,gla"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "demo_report.json").read_text())
    assert report["ok"] and report["remote_equals_local"] and report["cached_equals_uncached"]
    assert report["layer_types"] == ["rdn", "full_attention", "gla"]
    assert len(report["generated_ids"]) == 12
    assert report["remote_module"].startswith("transformers_modules")
    assert Path(report["checkpoint"]).is_absolute() and Path(report["checkpoint"]).is_dir()
    assert "remote == local   : True" in capsys.readouterr().out


def test_demo_rejects_unknown_layer_types(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--layer-types", "rdn,transformer"])
    assert "unknown layer type" in capsys.readouterr().err


def test_readme_main_command_is_a_valid_conversion():
    """The README's main command converts the embedded teacher; its flags must parse as written."""
    from hf_linattn.cli import build_parser

    readme = (REPO / "README.md").read_text()
    (line,) = [ln for ln in readme.splitlines() if ln.startswith("python3 -m venv") and "hf-linattn convert" in ln]
    argv = line.split(".venv/bin/hf-linattn ", 1)[1].split()
    args = build_parser().parse_args(argv)
    assert args.command == "convert" and args.base == "embedded-teacher"
    assert args.keep_softmax == 2 and args.mode == "rdn"
