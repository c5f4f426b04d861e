"""Helpers for tests that drive the installed ``hf-linattn`` command in a subprocess, as a user does."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

# The console script installed beside this Python (what `pip install -e .` put on PATH)
HF_LINATTN = Path(sys.executable).parent / "hf-linattn"
# One torch thread per subprocess: tests run beside each other on 2 cores, and OpenMP threads
# spinning against other processes make a tiny forward pass 50x slower.
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def run_cli(*args: str | Path, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``hf-linattn ARGS`` in ``cwd``; returns the finished process (text stdout/stderr)."""
    command = [str(HF_LINATTN), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd, env={**os.environ, **ENV})


def snapshot(*folders: Path) -> dict[str, str]:
    """sha256 of every file (hidden ones included) and the name of every folder under ``folders``."""
    state = {}
    for folder in folders:
        if not folder.exists():
            state[str(folder)] = "absent"
            continue
        for path in sorted(folder.rglob("*")):
            state[str(path)] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def assert_one_line_error(stderr: str, *fragments: str) -> str:
    """stderr is exactly one line, ``hf-linattn: error: ...``, holding every fragment; returns it."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr[-3000:]}"
    line = lines[0]
    assert line.startswith("hf-linattn: error: "), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line
