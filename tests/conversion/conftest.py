"""Shared conversion fixtures: one tiny-budget conversion of the embedded teacher, reused by several tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_linattn.cli import main

# A tiny budget: the point is the machinery, not the quality (docs/benchmarks.md measures quality).
# Tiny conversions compare loss trajectories across processes, resumes and versions. At the default peak
# learning rates (tuned for hundreds of steps) Adam's first steps amplify float noise past those comparisons'
# tolerances, so they train at LoLCATs' rates; the cosine schedule stays on.
TINY = ["--attention-transfer-steps", "4", "--lora-steps", "4", "--seq-len", "64", "--batch-size", "2",
        "--eval-tokens", "2048", "--max-train-tokens", "60000", "--agreement-prompts", "2",
        "--completion-prompts", "4", "--checkpoint-every", "1", "--no-progress",
        "--attention-transfer-lr", "1e-2", "--lora-lr", "1e-3"]  # fmt: skip


def convert_cli(output: Path, *extra: str) -> dict:
    assert main(["convert", "--output", str(output), "--mode", "rdn", *TINY, *extra]) == 0
    return json.loads((output / "conversion_report.json").read_text())


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("converted")
    return out, convert_cli(out, "--keep-softmax", "2")
