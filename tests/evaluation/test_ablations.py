"""Conversion ablations: every row is a real recipe, shared rows convert once, the CLI reports and resumes."""

from __future__ import annotations

import dataclasses
import json

import pytest

from hf_linattn.cli import ABLATION_GROUPS
from hf_linattn.conversion.pipeline import ConversionRecipe
from hf_linattn.errors import InputError
from hf_linattn.evaluation.ablations import GROUPS, REFERENCE, row_recipes
from tests.clitools import run_cli

BUDGET = {"attention_transfer_steps": 3, "lora_steps": 2}


def test_groups_are_recipe_fields_and_match_the_cli():
    assert tuple(GROUPS) == ABLATION_GROUPS
    fields = {f.name for f in dataclasses.fields(ConversionRecipe)}
    assert set(REFERENCE) <= fields
    assert all(set(change) <= fields for group in GROUPS.values() for change in group.values())


def test_rows_shared_by_groups_convert_once_and_every_row_changes_one_thing():
    rows, table = row_recipes(list(GROUPS), num_layers=8, budget=BUDGET)
    reference = table["clip"]["1"]
    # the reference row is the same conversion in five groups
    assert reference == table["rotary"]["off"] == table["loss"]["KL"] == table["selection"]["stage-1 error"]
    assert reference == table["gates"]["random"] == table["stage2"]["LoRA q/k/v/o"]
    assert reference in table["stage1"].values()
    default = ConversionRecipe()
    assert reference == table["lr"][f"{default.attention_transfer_lr:g} / {default.lora_lr:g}"]
    assert reference == table["schedule"][default.lr_schedule]
    assert reference == table["softmax"]["1 in 4"]
    # mode: 4 pure stacks; softmax: pure rdn is the mode group's rdn row, 1 in 8 is new
    assert table["softmax"]["pure"] == table["mode"]["rdn"]
    # mode, 1 in 8, reference, selection, clip, rotary, loss, gates, stage1, stage2, lr, schedule
    assert len(rows) == 4 + 1 + 1 + 2 + 2 + 1 + 1 + 1 + 2 + 2 + 1 + 1
    ref = rows[reference]
    assert ref["keep_softmax"] == 2 and ref["mode"] == "rdn" and ref["lora_steps"] == 2
    for group, labels in table.items():
        for name in labels.values():
            differs = {k for k in rows[name] if rows[name][k] != ref.get(k)}
            assert len(differs) <= 2, (group, differs)  # one setting (pure stacks also drop the softmax count)
    assert rows[table["softmax"]["1 in 8"]]["keep_softmax"] == 1
    assert rows[table["selection"]["KL-guided"]]["softmax_selection"] == "kl"
    assert rows[table["gates"]["from keys"]]["gate_init"] == "keys"
    assert rows[table["stage2"]["+ mixers in full"]]["train_mixers"] and rows[table["stage2"]["+ MLP LoRA"]]["lora_mlp"]
    lolcats = rows[table["lr"]["1e-2 / 1e-3"]]
    assert (lolcats["attention_transfer_lr"], lolcats["lora_lr"]) == (1e-2, 1e-3)
    assert rows[table["schedule"]["constant"]]["lr_schedule"] == "constant"
    stage1 = {rows[name].get("attention_transfer_params", default.attention_transfer_params)
              for name in table["stage1"].values()}  # fmt: skip
    assert stage1 == {"new", "qk", "all"}
    assert len(set(rows)) == len(rows)  # every row has its own folder
    ConversionRecipe(**rows[table["selection"]["KL-guided"]]).check()
    with pytest.raises(InputError, match="unknown ablation group"):
        row_recipes(["modes"], num_layers=8, budget=BUDGET)


def test_cli_converts_each_row_reports_json_png_and_resumes(tmp_path):
    tiny = ["--attention-transfer-steps", "2", "--lora-steps", "2", "--seq-len", "64", "--batch-size", "2",
            "--eval-tokens", "1024", "--max-train-tokens", "60000", "--agreement-prompts", "1",
            "--completion-prompts", "2", "--groups", "rotary", "--no-progress", "--output", "out/abl.json"]  # fmt: skip
    result = run_cli("bench", "ablations", *tiny, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out/abl.json").read_text())
    assert list(report["groups"]) == ["rotary"] and len(report["rows"]) == 2
    on, off = (report["rows"][report["groups"]["rotary"][k]] for k in ("on", "off"))
    for row in (on, off):
        assert row["ratio"] == pytest.approx(row["student_perplexity"] / row["teacher_perplexity"], rel=1e-3)
        assert 0 <= row["token_agreement"] <= 1 and len(row["kept_softmax_layers"]) == 2
    assert on["student_perplexity"] != off["student_perplexity"]  # the rows really are different conversions
    runs = tmp_path / "out/abl_runs"
    assert json.loads((runs / report["groups"]["rotary"]["on"] / "conversion_report.json").read_text())[
        "recipe"]["linear_use_rotary"] is True  # fmt: skip
    assert (tmp_path / "out/abl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| rotary | on |" in result.stdout and "| rotary | off |" in result.stdout
    again = run_cli("bench", "ablations", *tiny, cwd=tmp_path, timeout=300)  # finished rows are read back
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "out/abl.json").read_text())["rows"] == report["rows"]
