"""A tiny model whose linear layers decode through the Triton block kernel gives the torch path's greedy tokens.

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), forced by
resolving the block backend to "triton" (on CUDA, "auto" picks it by itself); on a CUDA device the model runs
there with "auto". Covers one-token decode steps (the fused step), the prefill block, and prompt lookup,
whose verify forwards record every block and whose rejections crop the cache through the kernel's records.
"""

from __future__ import annotations

import os

import pytest
import torch

import hf_linattn.kernels.ops as ops
from hf_linattn.generation import track_acceptance

from .tiny import HYBRID, prompt, tiny_model

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: Triton kernels cannot launch", allow_module_level=True)

import hf_linattn.kernels.triton.triton_ops as triton_ops  # noqa: E402

GREEDY = dict(do_sample=False, max_new_tokens=10, pad_token_id=0, eos_token_id=None)


def generate(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **{**GREEDY, **kwargs})


@pytest.fixture
def kernel_calls(monkeypatch) -> list[str]:
    """Every call of the Triton block kernel or fused step; on CPU, the block backend forced to "triton"."""
    calls: list[str] = []
    block, step = triton_ops.block_residual_attention_triton, triton_ops.decode_step_triton
    monkeypatch.setattr(triton_ops, "block_residual_attention_triton",
                        lambda *a, **kw: calls.append("block") or block(*a, **kw))  # fmt: skip
    monkeypatch.setattr(triton_ops, "decode_step_triton", lambda *a, **kw: calls.append("step") or step(*a, **kw))
    if not CUDA:
        resolve = ops.resolve_block_backend
        monkeypatch.setattr(ops, "resolve_block_backend", lambda backend, **kw: resolve("triton", **kw))
    return calls


def test_greedy_generate_through_the_kernels_equals_torch(kernel_calls):
    device = "cuda" if CUDA else "cpu"
    model = tiny_model(HYBRID, seed=3).to(device)  # every mode, with softmax layers between
    ids = prompt(2, 9, seed=31).to(device)
    with torch.no_grad():
        logits = model(ids).logits
    assert kernel_calls == ["block"] * 4, kernel_calls  # the prefill: one block per linear layer
    fast = generate(model, ids)
    assert "step" in kernel_calls
    kernel_calls.clear()
    with pytest.MonkeyPatch.context() as patch:  # the torch path, for reference
        patch.setattr(ops, "resolve_block_backend", lambda backend, **kw: "torch")
        reference = generate(model, ids)
        with torch.no_grad():
            logits_ref = model(ids).logits
    assert not kernel_calls
    assert torch.equal(fast, reference)
    assert torch.allclose(logits, logits_ref, atol=1e-4, rtol=1e-4)


def test_prompt_lookup_through_the_kernels_equals_plain_greedy(kernel_calls):
    device = "cuda" if CUDA else "cpu"
    model = tiny_model(HYBRID, seed=7).to(device)
    pattern = prompt(1, 6, seed=55)
    ids = torch.cat([pattern, pattern, pattern[:, :3]], 1).to(device)  # repeats, so lookups find candidates
    with track_acceptance(model) as stats:
        fast = generate(model, ids, prompt_lookup_num_tokens=4)
    assert stats.rounds > 0 and kernel_calls.count("block") > 4  # verify blocks ran through the kernel
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "resolve_block_backend", lambda backend, **kw: "torch")
        assert torch.equal(fast, generate(model, ids))
