"""The same convert command under accelerate with 2 CPU processes (DDP over gloo).

accelerate 1.15 routes ``--cpu`` to its single-process launcher unless MPI is configured, so two
CPU processes on one machine are started with ``--multi_gpu --num_processes 2`` (torchrun); the
conversion runs on CPU whenever CUDA is absent, and accelerate then picks the MULTI_CPU backend.

Each process takes half of every global batch and DDP averages the gradients, so the two-process
run must reproduce the single-process run of the same recipe up to float reduction order.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import TINY


def test_two_process_cpu_run_matches_one_process(converted, tmp_path):
    reference_dir, reference = converted
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate's launcher is installed with the package"
    out = tmp_path / "ddp"
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "hf_linattn.cli", "convert", "--output", str(out), "--mode", "rdn", *TINY,
           "--keep-softmax", "2"]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["num_processes"] == 2 and reference["num_processes"] == 1
    assert report["device"] == reference["device"] == "cpu"
    assert report["kept_softmax_layers"] == reference["kept_softmax_layers"]
    # before any update both runs see the same global batch. Stage 1 normalizes each process's MSE by
    # that process's own target power, so its averaged loss differs slightly
    assert report["stage1_losses"][0] == pytest.approx(reference["stage1_losses"][0], rel=1e-3)
    # later steps agree to float noise, which Adam's normalized first steps amplify on near-zero gradients
    assert report["stage1_losses"] == pytest.approx(reference["stage1_losses"], rel=1e-2)
    assert report["stage2_losses"] == pytest.approx(reference["stage2_losses"], rel=2e-2)
    assert report["stage1_layer_errors"] == pytest.approx(reference["stage1_layer_errors"], rel=2e-2)
    assert report["student_perplexity"] == pytest.approx(reference["student_perplexity"], rel=2e-2)
    assert "student perplexity" in result.stdout and result.stdout.count("student perplexity") == 1  # main prints once
    assert (reference_dir / "model.safetensors").is_file() and (out / "model.safetensors").is_file()
