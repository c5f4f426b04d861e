"""The model, generate(), a checkpoint's remote code and ``hf-linattn convert`` on a CUDA device.

Skipped without one (CI has none); run on a GPU machine with ``python -m pytest tests/modeling/test_cuda.py``.
Every check compares the GPU against the CPU or against another path on the GPU: the same weights must
give the same logits (fp32 tolerances for different kernels), the same greedy tokens, and finite bf16 outputs.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_linattn.kernels.modes import MODES
from hf_linattn.kernels.ops import resolve_backend
from tests.clitools import run_cli
from tests.generation.test_speculative import as_draft

from .test_remote_code import LOAD_WITHOUT_PACKAGE, run_python
from .tiny import HYBRID, STACKS, prompt, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
GREEDY = dict(do_sample=False, max_new_tokens=12, pad_token_id=0, eos_token_id=None)


def generate(model, ids, **kwargs):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **{**GREEDY, **kwargs})


def test_auto_backend_on_cuda_is_a_working_one():
    from hf_linattn.kernels.triton import SUPPORTED_MODES

    for mode in MODES:
        want = "triton" if mode in SUPPORTED_MODES else "torch"
        assert resolve_backend("auto", mode=mode, device=CUDA) == want


def test_forward_and_gradients_match_the_cpu(stack):
    _, layer_types = stack
    cpu = tiny_model(layer_types).train()
    gpu = copy.deepcopy(cpu).to(CUDA)
    ids = prompt(2, 70, seed=1)  # past one 64-token chunk
    losses = []
    for model, x in ((cpu, ids), (gpu, ids.to(CUDA))):
        out = model(x, labels=x)
        out.loss.backward()
        losses.append(out.loss)
        if model is cpu:
            cpu_logits = out.logits.detach()
        else:
            torch.testing.assert_close(out.logits.detach().cpu(), cpu_logits, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(losses[1].detach().cpu(), losses[0].detach(), rtol=1e-4, atol=1e-5)
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters()):
        scale = p_cpu.grad.abs().max().clamp_min(1e-6)
        assert (p_gpu.grad.cpu() - p_cpu.grad).abs().max() <= 2e-3 * scale, name


def test_generate_on_cuda_matches_uncached_and_cpu(stack):
    _, layer_types = stack
    cpu = tiny_model(layer_types)
    gpu = copy.deepcopy(cpu).to(CUDA)
    ids = prompt(2, 20, seed=2)
    cached = generate(gpu, ids.to(CUDA))
    assert torch.equal(generate(gpu, ids.to(CUDA), use_cache=False), cached)
    assert torch.equal(cached.cpu(), generate(cpu, ids))


def test_bf16_generate_on_cuda_is_finite_and_mostly_agrees():
    fp32 = tiny_model(HYBRID).to(CUDA)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    ids = prompt(1, 200, seed=3).to(CUDA)
    with torch.no_grad():
        logits = bf16(ids).logits
        want = fp32(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    agree = (logits.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree
    assert generate(bf16, ids).shape == (1, 212)


def test_speculative_and_static_compiled_decode_on_cuda():
    target = tiny_model(HYBRID, seed=1).to(CUDA)
    draft = as_draft(tiny_model(STACKS["gdn"], seed=3).to(CUDA))
    ids = prompt(1, 16, seed=4).to(CUDA)
    plain = generate(target, ids, max_new_tokens=24)
    assert torch.equal(generate(target, ids, max_new_tokens=24, assistant_model=draft), plain)
    assert torch.equal(generate(target, ids, max_new_tokens=24, prompt_lookup_num_tokens=3), plain)
    assert torch.equal(generate(target, ids, max_new_tokens=24, cache_implementation="static"), plain)

    from hf_linattn.modeling import LinAttnStaticCache  # one decode step captured as a CUDA graph

    with torch.no_grad():
        caches = [LinAttnStaticCache(target.config, max_cache_len=40) for _ in range(2)]
        for cache in caches:
            target(ids, cache=cache)
        step = torch.compile(target.forward, mode="reduce-overhead", fullgraph=True)
        nxt = plain[:, 16:17]
        for i in range(6):
            positions = torch.full((1, 1), 16 + i, device=CUDA)
            want = target(nxt, cache=caches[0], position_ids=positions).logits
            got = step(input_ids=nxt, cache=caches[1], position_ids=positions).logits.clone()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            nxt = plain[:, 17 + i : 18 + i]


def test_checkpoint_remote_code_runs_on_cuda(tmp_path):
    model = tiny_model(HYBRID, linear_use_rotary=True)
    checkpoint = tmp_path / "ckpt"
    model.save_pretrained(checkpoint)
    ids = prompt(1, 40, seed=5)
    io_file = tmp_path / "io.safetensors"
    save_file({"input_ids": ids}, io_file)
    # the clean-process loader of test_remote_code, with the model and inputs moved to the GPU
    code = LOAD_WITHOUT_PACKAGE.replace(".eval()", '.eval().to("cuda")').replace(
        'ids = load_file(io_file)["input_ids"]', 'ids = load_file(io_file)["input_ids"].to("cuda")'
    )
    code = code.replace('save_file({"input_ids": ids, "logits": logits, "greedy": greedy}, io_file)',
                        'save_file({"logits": logits.cpu(), "greedy": greedy.cpu(), '
                        '"on_cuda": torch.tensor(int(logits.is_cuda))}, io_file)')  # fmt: skip
    result = run_python(code, str(checkpoint), str(io_file), cwd=tmp_path,
                        env_extra={"HF_MODULES_CACHE": str(tmp_path / "modules")})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    remote = load_file(io_file)
    assert remote["on_cuda"].item() == 1
    gpu = model.to(CUDA)
    with torch.no_grad():
        logits = gpu(ids.to(CUDA)).logits.cpu()
    torch.testing.assert_close(remote["logits"], logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(remote["greedy"], generate(gpu, ids.to(CUDA), max_new_tokens=8).cpu())


def test_convert_runs_on_cuda(tmp_path):
    out = tmp_path / "student"
    result = run_cli("convert", "--output", out, "--mode", "rdn", "--keep-softmax", "1",
                     "--attention-transfer-steps", "6", "--lora-steps", "6", "--no-progress", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["device"] == "cuda"
    assert math.isfinite(report["student_perplexity"]) and report["student_perplexity"] < 1000  # random: ~4096
    assert (out / "model.safetensors").is_file() and (out / "lora_adapter").is_dir()
    print(json.dumps({k: report[k] for k in ("teacher_perplexity", "student_perplexity", "greedy_agreement",
                                            "kept_softmax_layers", "seconds")}))  # fmt: skip
