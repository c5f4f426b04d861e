"""MQAR: the data is Zoology's construction, the harness can fail (softmax learns, chance does not), the CLI reports."""

from __future__ import annotations

import json

import pytest
import torch

from hf_linattn.cli import BENCH_MIXERS, build_parser
from hf_linattn.errors import InputError
from hf_linattn.evaluation.mqar import (
    IGNORE,
    MIXERS,
    MqarSettings,
    accuracy,
    mqar_batch,
    mqar_settings_from_args,
    paper_claims,
    summarize,
    train_one,
)
from tests.clitools import run_cli

LAYOUT = {"seq_len": 64, "num_pairs": 8, "vocab_size": 64}


def test_every_key_is_queried_once_and_labelled_with_its_value():
    ids, labels = mqar_batch(32, **LAYOUT, generator=torch.Generator().manual_seed(0))
    assert ids.shape == labels.shape == (32, 64)
    half, context = 32, 16
    for row, lab in zip(ids.tolist(), labels.tolist()):
        keys, values = row[0:context:2], row[1:context:2]
        assert len(set(keys)) == 8 and all(1 <= k < half for k in keys)
        assert len(set(values)) == 8 and all(half <= v < 64 for v in values)
        answers = [t for t, y in enumerate(lab) if y != IGNORE]
        assert len(answers) == 8 and min(answers) >= context  # no answer inside the pairs themselves
        pair = dict(zip(keys, values))
        assert sorted(row[t] for t in answers) == sorted(keys)  # every key queried exactly once
        for t in answers:
            assert lab[t] == pair[row[t]]  # the label at a query is the value paired with that key
            # no leakage: the answer appears in the visible input 0..t only once, right after its key in the pairs
            assert [s for s in range(t + 1) if row[s] == lab[t]] == [keys.index(row[t]) * 2 + 1]
        filler = set(range(context, 64)) - set(answers) - {t + 1 for t in answers}
        assert all(row[s] == 0 for s in filler)


def test_batches_differ_by_seed_and_repeat_by_seed():
    a = mqar_batch(4, **LAYOUT, generator=torch.Generator().manual_seed(1))
    b = mqar_batch(4, **LAYOUT, generator=torch.Generator().manual_seed(1))
    c = mqar_batch(4, **LAYOUT, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


@pytest.mark.parametrize(
    ("seq_len", "pairs", "vocab", "fragment"),
    [(16, 8, 64, "at least 32 tokens"), (64, 8, 16, "vocabulary of at least 18")],
)
def test_layouts_that_cannot_fit_are_refused(seq_len, pairs, vocab, fragment):
    with pytest.raises(InputError, match=fragment):
        MqarSettings(pairs=(pairs,), seq_len=seq_len, vocab_size=vocab).check()


@pytest.fixture
def one_thread():
    """Tiny ops: one torch thread is faster than two when other processes share the cores (no OpenMP spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_softmax_learns_a_trivial_mqar_and_an_untrained_model_is_at_chance(one_thread):
    """The harness can fail both ways: 100 steps of softmax reach ~50% (seeds 0/1: 57%/47%), no training ~chance."""
    tiny = {"seq_len": 16, "vocab_size": 16, "test_examples": 128}
    learned = train_one("full_attention", dim=32, num_pairs=2, seed=0,
                        settings=MqarSettings(steps=100, batch_size=32, lr=3e-3, **tiny))  # fmt: skip
    untrained = train_one("full_attention", dim=32, num_pairs=2, seed=0,
                          settings=MqarSettings(steps=1, batch_size=2, lr=1e-9, **tiny))  # fmt: skip
    chance = 1 / 8  # 8 possible values
    assert untrained["accuracy"] < 2 * chance, untrained
    assert learned["accuracy"] > 3 * chance, learned


def test_accuracy_counts_answer_positions_only():
    ids, labels = mqar_batch(8, **LAYOUT, generator=torch.Generator().manual_seed(3))

    class Oracle(torch.nn.Module):  # predicts the label at answers, garbage elsewhere
        def __init__(self):
            super().__init__()
            self.model = lambda input_ids, use_cache: type("O", (), {"last_hidden_state": labels.clamp(min=0)})()
            self.lm_head = lambda answers: torch.nn.functional.one_hot(answers, 64).float()

    assert accuracy(Oracle(), ids, labels) == 1.0


def test_summary_and_claims_compare_means_per_cell():
    runs = [{"mixer": m, "dim": 64, "pairs": 4, "seed": s, "accuracy": a}
            for m, accs in {"gdn": [0.5, 0.7], "rdn": [0.4, 0.4], "gla": [0.1, 0.1], "rla": [0.3, 0.1]}.items()
            for s, a in enumerate(accs)]  # fmt: skip
    rows = {r["mixer"]: r for r in summarize(runs)}
    assert rows["gdn"]["mean"] == pytest.approx(0.6) and rows["gdn"]["std"] == pytest.approx(0.1414, abs=1e-3)
    claims = paper_claims(list(rows.values()))
    assert claims["rdn>=gdn"]["cells_holding"] == 0 and claims["rdn>=gdn"]["mean_difference"] == pytest.approx(-0.2)
    assert claims["rla>=gla"]["cells_holding"] == 1


def test_cli_defaults_are_the_settings_defaults():
    assert tuple(BENCH_MIXERS) == tuple(MIXERS)
    args = build_parser().parse_args(["bench", "mqar"])
    assert mqar_settings_from_args(args) == MqarSettings()


def test_bench_mqar_writes_json_and_png(tmp_path):
    result = run_cli("bench", "mqar", "--dims", "32", "--pairs", "2", "--seeds", "1", "--seq-len", "16", "--steps", "2",
                     "--batch-size", "4", "--mixers", "gdn,rdn,full_attention", "--workers", "1", "--no-progress",
                     "--output", "out/mqar.json", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""  # --no-progress: no bar
    report = json.loads((tmp_path / "out/mqar.json").read_text())
    assert [(r["mixer"], r["dim"], r["pairs"], r["seeds"]) for r in report["summary"]] == [
        ("gdn", 32, 2, 1), ("rdn", 32, 2, 1), ("full_attention", 32, 2, 1)]  # fmt: skip
    assert all(0 <= r["accuracy"] <= 1 for r in report["runs"]) and set(report["paper_claims"]) == {"rdn>=gdn"}
    assert (tmp_path / "out/mqar.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| dim | pairs | gdn | rdn | softmax |" in result.stdout
