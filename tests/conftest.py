"""Shared test setup. TRITON_INTERPRET must be set before any @triton.jit decorator runs."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
