"""Hybrid selection: highest stage-1 error, evenly spaced, or KL-guided softmax layers."""

from __future__ import annotations

import json

import pytest

from hf_linattn.cli import GATE_INITS as CLI_GATE_INITS
from hf_linattn.cli import SELECTIONS as CLI_SELECTIONS
from hf_linattn.conversion import hybrid_layer_types, select_softmax_layers
from hf_linattn.conversion.pipeline import ConversionRecipe, choose_softmax_layers
from hf_linattn.conversion.selection import SELECTIONS, evenly_spaced_layers, select_by_score
from hf_linattn.conversion.transfer import GATE_INITS

from .conftest import convert_cli
from .test_transfer import qwen2


def test_highest_errors_stay_softmax():
    errors = {0: 0.1, 1: 0.7, 2: 0.3, 3: 0.7, 4: 0.05}
    assert select_softmax_layers(errors, 1) == [1]  # tie with layer 3 breaks toward the lower index
    assert select_softmax_layers(errors, 3) == [1, 2, 3]
    assert select_softmax_layers(errors, 0) == []
    with pytest.raises(ValueError, match="keep must be between 0 and"):
        select_softmax_layers(errors, 6)


def test_kept_layers_keep_their_base_attention_type():
    config = qwen2().config  # layers 2 and 3 slide in this base
    assert hybrid_layer_types(config, "rdn", [0, 3]) == ["full_attention", "rdn", "rdn", "sliding_attention"]
    with pytest.raises(ValueError, match="out of range"):
        hybrid_layer_types(config, "rdn", [4])
    with pytest.raises(ValueError, match="unknown mode"):
        hybrid_layer_types(config, "mamba", [])


def test_evenly_spaced_layers_take_the_middle_of_each_group():
    assert evenly_spaced_layers(8, 2) == [2, 6]
    assert evenly_spaced_layers(8, 1) == [4]
    assert evenly_spaced_layers(6, 3) == [1, 3, 5]
    assert evenly_spaced_layers(4, 0) == []
    with pytest.raises(ValueError, match="keep must be between 0 and 4"):
        evenly_spaced_layers(4, 5)


def test_lowest_kl_scores_are_kept():
    scores = {0: 0.30, 1: 0.10, 2: 0.20, 3: 0.10}
    assert select_by_score(scores, 1) == [1]  # tie with layer 3 breaks toward the lower index
    assert select_by_score(scores, 3) == [1, 2, 3]


def test_selection_and_gate_init_names_match_the_cli():
    assert tuple(SELECTIONS) == tuple(CLI_SELECTIONS)
    assert tuple(GATE_INITS) == tuple(CLI_GATE_INITS)


def test_kl_guided_conversion_keeps_the_lowest_kl_layers_and_resumes_them(tmp_path):
    """End to end through the CLI: the kept layers are the lowest-KL ones and the scores reach the report."""
    out = tmp_path / "kl"
    report = convert_cli(out, "--keep-softmax", "2", "--softmax-selection", "kl", "--selection-steps", "2")
    selection = report["softmax_selection"]
    assert selection["strategy"] == "kl"
    scores = {int(i): s for i, s in selection["scores"].items()}
    assert sorted(scores) == list(range(8)) and all(s >= 0 for s in scores.values())
    assert len(set(scores.values())) > 1  # each candidate really trained and scored its own student
    assert report["kept_softmax_layers"] == sorted(sorted(scores, key=lambda i: (scores[i], i))[:2])
    assert report["recipe"]["softmax_selection"] == "kl" and report["recipe"]["selection_steps"] == 2


def test_even_selection_and_gates_from_keys_through_the_cli(tmp_path):
    out = tmp_path / "even"
    report = convert_cli(out, "--keep-softmax", "2", "--softmax-selection", "even", "--lora-steps", "1",
                         "--gate-init", "keys")  # fmt: skip
    assert report["kept_softmax_layers"] == [2, 6]
    assert report["softmax_selection"] == {"strategy": "even"}
    assert report["layer_types"][2] == report["layer_types"][6] == "full_attention"
    assert report["recipe"]["gate_init"] == "keys"
    assert "decay gates started from the teacher's keys" in (out / "README.md").read_text()


def test_a_resumed_run_reuses_the_saved_kl_scores(tmp_path):
    """Scores saved by an interrupted run decide the layers; nothing is recomputed (no model is even needed)."""
    (tmp_path / "selection.json").write_text(json.dumps({"0": 0.5, "1": 0.1, "2": 0.4, "3": 0.2}))
    recipe = ConversionRecipe(keep_softmax=2, softmax_selection="kl")
    kept, selection = choose_softmax_layers(None, recipe, {}, [0.0] * 4, None, tmp_path, main=True, progress=False)
    assert kept == [1, 3]
    assert selection == {"strategy": "kl", "scores": {0: 0.5, 1: 0.1, 2: 0.4, 3: 0.2}}
