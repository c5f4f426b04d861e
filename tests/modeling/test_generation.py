"""Generation through generate() itself: greedy, sampling and beam search, cached vs uncached, padding."""

from __future__ import annotations

import pytest
import torch

from hf_linattn import LinAttnCache

from .tiny import STACKS, prompt, tiny_model


def generate(model, input_ids, **kwargs) -> torch.Tensor:
    kwargs.setdefault("max_new_tokens", 10)
    kwargs.setdefault("pad_token_id", 0)
    kwargs.setdefault("eos_token_id", None)
    with torch.no_grad():
        return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)


def test_greedy_cached_equals_uncached(stack):
    _, layer_types = stack
    model = tiny_model(layer_types)
    ids = prompt(2, 12, seed=1)
    cached = generate(model, ids, do_sample=False, max_new_tokens=14)
    uncached = generate(model, ids, do_sample=False, max_new_tokens=14, use_cache=False)
    assert cached.shape == (2, 26)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0, 12:].tolist())) > 1, "a degenerate model would make this test meaningless"


def test_sampling_with_seed(stack):
    _, layer_types = stack
    model = tiny_model(layer_types)
    ids = prompt(2, 9, seed=2)
    runs = []
    for use_cache in (True, True, False):
        torch.manual_seed(123)
        runs.append(generate(model, ids, do_sample=True, top_k=0, temperature=1.5, use_cache=use_cache))
    assert torch.equal(runs[0], runs[1]), "the same seed must give the same samples"
    assert torch.equal(runs[0], runs[2]), "cached and uncached sampling must agree under the same seed"
    torch.manual_seed(321)
    other = generate(model, ids, do_sample=True, top_k=0, temperature=1.5)
    assert not torch.equal(other, runs[0])


def test_beam_search_cached_equals_uncached(stack):
    _, layer_types = stack
    model = tiny_model(layer_types)
    ids = prompt(2, 8, seed=3)
    kwargs = {"num_beams": 3, "do_sample": False, "max_new_tokens": 8, "num_return_sequences": 2}
    cached = generate(model, ids, **kwargs)
    uncached = generate(model, ids, use_cache=False, **kwargs)
    assert cached.shape == (4, 16)
    assert torch.equal(cached, uncached)


def test_beam_search_reorders_states():
    """Beam search must differ from greedy somewhere, or reordering is never exercised."""
    model = tiny_model(STACKS["hybrid"], seed=5)
    differs = False
    for seed in range(6):
        ids = prompt(1, 6, seed=seed)
        beam = generate(model, ids, num_beams=4, do_sample=False, max_new_tokens=10)
        beam_ref = generate(model, ids, num_beams=4, do_sample=False, max_new_tokens=10, use_cache=False)
        assert torch.equal(beam, beam_ref)
        differs |= not torch.equal(beam, generate(model, ids, do_sample=False, max_new_tokens=10))
    assert differs


def test_left_padded_batch_equals_each_sample_alone(stack):
    _, layer_types = stack
    model = tiny_model(layer_types)
    lengths = [11, 4, 8]
    prompts = [prompt(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=9, pad_token_id=0)
    for i, p in enumerate(prompts):
        alone = generate(model, p[None], do_sample=False, max_new_tokens=9)
        assert torch.equal(batched[i, width:], alone[0, len(p) :]), f"sample {i}"


def test_left_padding_writes_nothing_into_states():
    model = tiny_model(STACKS["hybrid"])
    p = prompt(1, 7, seed=20)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), p], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones_like(p)], 1)
    with torch.no_grad():
        alone = model(p, use_cache=True).past_key_values
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        padded_cache = model(padded, attention_mask=mask, position_ids=pos, use_cache=True).past_key_values
    checked = 0
    for i, (a, b) in enumerate(zip(alone.layers, padded_cache.layers)):
        if alone.is_linear[i]:
            for x, y in zip(a.state, b.state):
                if x is not None:
                    torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(b.conv, a.conv, rtol=1e-4, atol=1e-5)
            checked += 1
    assert checked == 4


@pytest.mark.parametrize("name", list(STACKS))
def test_prefill_then_decode_steps_equal_one_forward(name):
    model = tiny_model(STACKS[name])
    ids = prompt(2, 90, seed=30)  # prefill of 70 crosses a chunk boundary and the sliding window
    with torch.no_grad():
        full = model(ids).logits
        cache = LinAttnCache(model.config)
        logits = [model(ids[:, :70], past_key_values=cache, use_cache=True).logits]
        for t in range(70, 90):
            logits.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    assert cache.get_seq_length() == 90
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-4, atol=1e-4)


def test_cache_reorder_and_select():
    model = tiny_model(STACKS["hybrid"])
    ids = prompt(3, 9, seed=32)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        reordered = model(ids[[2, 0, 1]], use_cache=True).past_key_values
    before = cache.nbytes()
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    for i, (layer, want) in enumerate(zip(cache.layers, reordered.layers)):
        if cache.is_linear[i]:
            torch.testing.assert_close(layer.state[0], want.state[0])
            torch.testing.assert_close(layer.conv, want.conv)
        else:
            torch.testing.assert_close(layer.keys, want.keys)
    cache.batch_select_indices(torch.tensor([1]))
    assert cache.nbytes() * 3 == before
    cache.batch_repeat_interleave(2)
    assert cache.nbytes() * 3 == before * 2


def test_sliding_layers_keep_only_the_window():
    model = tiny_model(["sliding_attention", "full_attention"], sliding_window=5)
    with torch.no_grad():
        cache = model(prompt(1, 30, seed=33), use_cache=True).past_key_values
    assert cache.layers[0].keys.shape[2] == 5 - 1  # transformers' sliding layer: the query itself + window - 1
    assert cache.layers[1].keys.shape[2] == 30


def test_pure_linear_cache_size_does_not_grow():
    model = tiny_model(STACKS["rdn"])
    sizes = []
    for n in (10, 200):
        with torch.no_grad():
            sizes.append(model(prompt(1, n, seed=34), use_cache=True).past_key_values.nbytes())
    assert sizes[0] == sizes[1] > 0


def test_training_step_reaches_every_parameter(stack):
    _, layer_types = stack
    model = tiny_model(layer_types).train()
    ids = prompt(2, 70, seed=35)
    loss = model(ids, labels=ids).loss
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert torch.isfinite(loss)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(STACKS["hybrid"]).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        ids = prompt(2, 40, seed=37)
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_generate_continues_from_a_returned_cache():
    model = tiny_model(STACKS["hybrid"])
    ids = prompt(1, 12, seed=38)
    full = generate(model, ids, do_sample=False, max_new_tokens=10)
    with torch.no_grad():
        first = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                               pad_token_id=0, eos_token_id=None)  # fmt: skip
        assert isinstance(first.past_key_values, LinAttnCache)
        second = model.generate(first.sequences, past_key_values=first.past_key_values, max_new_tokens=5,
                                do_sample=False, pad_token_id=0, eos_token_id=None)  # fmt: skip
    assert torch.equal(second, full)
