"""Shared test setup. TRITON_INTERPRET must be set before any @triton.jit decorator runs."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

# Under pytest-xdist (the README's `-n 2`) each worker takes one core: more threads than cores spin against
# each other and make tiny forward passes many times slower.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))

import pytest  # noqa: E402


@pytest.fixture(params=["gla", "gdn", "rla", "rdn", "hybrid"])
def stack(request) -> tuple[str, list[str]]:
    """(name, layer_types) of every pure mode and a hybrid (tests/modeling/tiny.py)."""
    from tests.modeling.tiny import STACKS

    return request.param, STACKS[request.param]
