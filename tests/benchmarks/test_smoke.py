"""The benchmark scripts still run (``--quick`` sizes) and report every ratio they promise.

Timings themselves are never asserted: speed is measured by the scripts, not by tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_quick(script: str, report: Path) -> dict:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--quick", "--no-progress", "--json", str(report)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "|" in result.stdout, "a table of ratios is printed"
    return json.loads(report.read_text())["results"]


def test_bench_ops_reports_speedups_and_residual_costs(tmp_path):
    results = run_quick("bench_ops.py", tmp_path / "ops.json")
    assert set(results["speedup_vs_recurrent"]) == {"gla", "gdn", "rla", "rdn"}
    assert all(r["speedup"] > 0 for r in results["speedup_vs_recurrent"].values())
    assert set(results["residual_over_base"]) == {"rla/gla", "rdn/gdn"}


def test_bench_cli_reports_ratios_to_a_bare_python(tmp_path):
    results = run_quick("bench_cli.py", tmp_path / "cli.json")
    baseline = "python -c 'import argparse'"
    assert {baseline, "hf-linattn --help", "argument error: hf-linattn convert --keep-softmax -1"} <= set(results)
    assert results[baseline]["ratio_to_baseline"] == 1.0
    assert all(r["ratio_to_baseline"] > 0 and len(r["seconds"]) == 2 for r in results.values())


def test_bench_gpu_runs_or_says_there_is_no_gpu(tmp_path):
    """Without CUDA: a clear message, exit 0, nothing written. With CUDA: every table's numbers in the report."""
    import torch

    report = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--quick", "--no-progress", "--json", str(report)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if not torch.cuda.is_available():
        assert "no CUDA device here" in result.stdout and not report.exists()
        return
    results = json.loads(report.read_text())["results"]
    assert set(results["decode"]) == {"gla", "gdn", "rla", "rdn"} and not results["errors"]
    assert all(d["n=16 / n=1"] > 0 for d in results["decode"].values())
    assert set(results["residual_over_base"]) == {"T=512", "T=1024"}


@pytest.mark.slow
def test_bench_model_reports_prefill_decode_and_cache(tmp_path):
    results = run_quick("bench_model.py", tmp_path / "model.json")
    for key in ("prefill_ms", "decode_ms_per_token", "cache_bytes"):
        assert {"gla", "gdn", "rla", "rdn", "hybrid", "llama"} <= set(results[key]), key
    # a pure linear stack's cache does not depend on the context length: exact, not a timing
    assert all(results["cache_bytes"][m]["ratio"] == 1.0 for m in ("gla", "gdn", "rla", "rdn"))


@pytest.mark.slow
def test_bench_conversion_reports_student_over_teacher(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_conversion.py"), "--quick", "--no-progress",
         "--variants", "hybrid", "gla", "--output-dir", str(tmp_path / "runs"), "--json", str(tmp_path / "c.json")],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "c.json").read_text())["results"]
    assert set(results) == {"hybrid", "gla"}
    assert len(results["hybrid"]["kept_softmax_layers"]) == 2 and results["gla"]["kept_softmax_layers"] == []
    assert all(r["ratio"] == pytest.approx(r["student_perplexity"] / r["teacher_perplexity"], rel=1e-3)
               for r in results.values())  # fmt: skip
    assert "| hybrid" in result.stdout


def test_bench_decoding_reports_the_issue_table(tmp_path):
    results = run_quick("bench_decoding.py", tmp_path / "decoding.json")
    assert results["all_identical"] is True  # the script also exits non-zero otherwise
    rows = results["strategies"]
    assert {"speculative: student + draft", "speculative: teacher + draft", "speculative: teacher + student as draft",
            "lookahead (code): student", "lookahead (code): teacher", "prompt lookup (copying code): student",
            "prompt lookup (copying code): teacher"} == set(rows)  # fmt: skip
    for entry in rows.values():
        assert entry["default"] in entry["settings"] and entry["best"] in entry["settings"]
        for s in entry["settings"].values():
            assert s["identical_greedy"] and s["speedup_cpu"] > 0 and s["speedup_wall"] > 0
            assert s["tokens_per_target_forward"] >= 1 and s["round_over_plain_token"] > 0
    assert rows["speculative: student + draft"]["settings"]["adaptive"]["draft_over_target_step"] > 0
    assert set(results["forward_costs"]) == {"student", "student, recording", "teacher", "draft"}
    assert all(set(by_k) == {"1", "4"} for by_k in results["forward_costs"].values())
    profile = results["round_profile"]["speculative: student + draft"]["cpu"]["ms_per_round"]
    assert set(profile) == {"draft", "verify", "crop", "generate() overhead"}
    assert len(results["long_context"]) == 2 and all(
        all(r["identical"].values()) for r in results["long_context"].values()
    )
    assert len(results["goals"]) == 10  # every row of issue 10's table, met or not


def test_copy_prompts_continue_by_copying_their_prompt():
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from _decoding import copy_prompts, copy_score
    from transformers import AutoTokenizer

    from hf_linattn.assets import TEACHER_DIR

    pattern = list(range(10, 30))
    assert copy_score(pattern * 4, start=40, prompt_tokens=40, new_tokens=20) == 1.0
    assert copy_score(list(range(100)), start=50, prompt_tokens=50, new_tokens=20) == 0.0
    tok = AutoTokenizer.from_pretrained(TEACHER_DIR)
    chosen = copy_prompts(tok, count=3, prompt_tokens=64, new_tokens=16)
    assert len(chosen) == 3 and all(ids.shape == (1, 64) for ids, _ in chosen)
    assert min(score for _, score in chosen) >= 0.5  # most of each continuation is copyable from its prompt


def test_mqar_script_reports_every_mixer_and_a_png(tmp_path):
    results = run_quick("mqar.py", tmp_path / "mqar.json")
    assert [r["mixer"] for r in results["summary"]] == ["gla", "gdn", "rla", "rdn", "full_attention"]
    assert set(results["paper_claims"]) == {"rdn>=gdn", "rla>=gla"}
    assert (tmp_path / "mqar.png").read_bytes()[:4] == b"\x89PNG"
