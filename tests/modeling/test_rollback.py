"""Cache rollback: crop(-j) after n logged tokens equals processing only the first n - j of them.

Checked for S, R, conv and keys/values, for every mode and a hybrid with sliding and full
softmax layers, with the logged tokens fed as one block and as several forwards (as a draft
model does), and beyond the sliding window.
"""

from __future__ import annotations

import pytest
import torch

from hf_linattn import LinAttnCache

from .tiny import STACKS, prompt, tiny_model


def assert_rel(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    """Norm-relative error ||got - want|| / ||want|| <= tol (fp32 matmuls of other shapes round differently)."""
    assert got.shape == want.shape, what
    err = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def assert_same_cache(got: LinAttnCache, want: LinAttnCache, tol: float = 1e-6) -> None:
    assert got.get_seq_length() == want.get_seq_length()
    for i, (a, b) in enumerate(zip(got.layers, want.layers)):
        if want.is_linear[i]:
            for name, x, y in zip("SR", a.state, b.state):
                assert (x is None) == (y is None)
                if y is not None:
                    assert_rel(x, y, tol, f"layer {i} {name}")
            assert_rel(a.conv, b.conv, tol, f"layer {i} conv")
        else:
            # keys a sliding layer may keep beyond its window are never attended; compare the window
            n = b.keys.shape[2]
            assert_rel(a.keys[:, :, -n:], b.keys, tol, f"layer {i} keys")
            assert_rel(a.values[:, :, -n:], b.values, tol, f"layer {i} values")


def run(model, ids, cache, splits):
    """Feed ids [B, T] through the model in consecutive forwards of the given sizes; return the logits."""
    out, start = [], 0
    for size in splits:
        out.append(model(ids[:, start : start + size], past_key_values=cache, use_cache=True).logits)
        start += size
    return torch.cat(out, 1)


CASES = [  # (splits of the 6 logged tokens, tokens to undo, dtype)
    ([6], 0, torch.float64), ([6], 2, torch.float64), ([6], 6, torch.float64),
    ([1] * 6, 1, torch.float64), ([1] * 6, 4, torch.float64), ([2, 4], 3, torch.float64), ([4, 2], 5, torch.float64),
    ([6], 2, torch.float32), ([1] * 6, 4, torch.float32), ([2, 4], 3, torch.float32),
]  # fmt: skip


@pytest.mark.parametrize(("splits", "undo", "dtype"), CASES, ids=[f"{s}-undo{u}-{str(d)[6:]}" for s, u, d in CASES])
def test_crop_restores_the_state_after_the_accepted_tokens(stack, splits, undo, dtype):
    name, layer_types = stack
    model = tiny_model(layer_types).to(dtype)
    # fp64 proves the rollback exact; in fp32, matmuls over 6 vs 3 rows round differently, and in the
    # 6-layer hybrid that rounding compounds to a few 1e-6 by the last layers
    tol = 1e-10 if dtype == torch.float64 else (5e-6 if name == "hybrid" else 1e-6)
    ids = prompt(2, 30, seed=40)
    with torch.no_grad():
        cache = LinAttnCache(model.config)
        model(ids[:, :24], past_key_values=cache, use_cache=True)  # past the sliding window (5)
        cache.activate_past_recording()
        run(model, ids[:, 24:], cache, splits)
        cache.crop(-undo)
        reference = LinAttnCache(model.config)
        model(ids[:, :24], past_key_values=reference, use_cache=True)
        if undo < 6:  # the accepted tokens alone, from the same prefix
            model(ids[:, 24 : 30 - undo], past_key_values=reference, use_cache=True)
        assert_same_cache(cache, reference, tol)
        # and the next step from the rolled-back cache is the next step from the reference
        nxt = prompt(2, 1, seed=41)
        got = model(nxt, past_key_values=cache, use_cache=True).logits
        want = model(nxt, past_key_values=reference, use_cache=True).logits
    assert_rel(got, want, 10 * tol, "next logits")


def test_repeated_rounds_of_draft_and_rollback(stack):
    """Several verify-and-crop rounds in a row, as assisted decoding does, end where the accepted tokens lead."""
    _, layer_types = stack
    model = tiny_model(layer_types).double()
    ids = prompt(1, 60, seed=42)
    accepted = ids[:, :10]
    with torch.no_grad():
        cache = LinAttnCache(model.config)
        model(accepted, past_key_values=cache, use_cache=True)
        cache.activate_past_recording()
        gen = torch.Generator().manual_seed(43)
        for _ in range(6):
            block = prompt(1, 5, seed=int(torch.randint(0, 10_000, (1,), generator=gen)))
            model(block, past_key_values=cache, use_cache=True)
            keep = int(torch.randint(0, 6, (1,), generator=gen))
            cache.crop(-(5 - keep))
            accepted = torch.cat([accepted, block[:, :keep]], 1)
        reference = LinAttnCache(model.config)
        model(accepted, past_key_values=reference, use_cache=True)
    assert_same_cache(cache, reference, 1e-10)


def test_crop_to_a_length_and_refusals():
    model = tiny_model(STACKS["hybrid"]).double()
    ids = prompt(1, 20, seed=44)
    with torch.no_grad():
        cache = LinAttnCache(model.config, rollback_horizon=2)
        model(ids[:, :10], past_key_values=cache, use_cache=True)
        with pytest.raises(RuntimeError, match="activate_past_recording"):
            cache.crop(-1)
        cache.activate_past_recording()
        model(ids[:, 10:16], past_key_values=cache, use_cache=True)
        with pytest.raises(RuntimeError, match="cannot roll back 7 tokens: this cache can undo 6"):
            cache.crop(-7)
        cache.crop(13)  # keep the first 13 tokens = undo 3
        with pytest.raises(RuntimeError, match="cannot roll back 3 tokens: this cache can undo 2"):
            cache.crop(-3)  # the sliding layer keeps rollback_horizon = 2 keys beyond its window
        reference = LinAttnCache(model.config)
        model(ids[:, :13], past_key_values=reference, use_cache=True)
    assert_same_cache(cache, reference, 1e-10)


def test_blocks_longer_than_a_chunk_roll_back(stack):
    """Drafts of any length (transformers' schedule grows past 64 after full acceptances)."""
    _, layer_types = stack
    model = tiny_model(layer_types).double()
    ids = prompt(1, 110, seed=48)
    with torch.no_grad():
        cache = LinAttnCache(model.config)
        model(ids[:, :20], past_key_values=cache, use_cache=True)
        cache.activate_past_recording()
        model(ids[:, 20:100], past_key_values=cache, use_cache=True)  # an 80-token verify block
        cache.crop(-70)
        reference = LinAttnCache(model.config)
        model(ids[:, :30], past_key_values=reference, use_cache=True)
        assert_same_cache(cache, reference, 1e-10)


def test_crop_past_the_previous_crop_point(stack):
    """Universal assisted decoding re-tokenizes and undoes tokens it had accepted in an earlier round."""
    _, layer_types = stack
    model = tiny_model(layer_types).double()
    ids = prompt(1, 40, seed=49)
    with torch.no_grad():
        cache = LinAttnCache(model.config)
        model(ids[:, :12], past_key_values=cache, use_cache=True)
        cache.activate_past_recording()
        model(ids[:, 12:17], past_key_values=cache, use_cache=True)
        cache.crop(-2)  # 15 kept
        for t in range(15, 18):  # three one-token steps, as a draft model runs them
            model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache.crop(-6)  # back to 12: three tokens before the previous crop point
        reference = LinAttnCache(model.config)
        model(ids[:, :12], past_key_values=reference, use_cache=True)
        assert_same_cache(cache, reference, 1e-10)
        nxt = ids[:, 12:14]
        torch.testing.assert_close(model(nxt, past_key_values=cache).logits,
                                   model(nxt, past_key_values=reference).logits, rtol=1e-10, atol=1e-12)  # fmt: skip


def test_recording_memory_is_the_compact_record():
    """Per linear layer: the entering states once, then keys, writes and decays per token (not K x V per token)."""
    model = tiny_model(STACKS["rdn"])
    with torch.no_grad():
        cache = LinAttnCache(model.config)
        model(prompt(1, 8, seed=45), past_key_values=cache, use_cache=True)
        cache.activate_past_recording()
        model(prompt(1, 4, seed=46), past_key_values=cache, use_cache=True)
        model(prompt(1, 3, seed=47), past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    S, _ = layer.state
    H, K, V = S.shape[1:]
    states = 2 * S.numel() * S.element_size()  # S0 and R0
    per_token = H * (K + 2 * V) * 4 + H * 8  # keys, writes into S and R (fp32), log-decays (fp64)
    conv = (layer.conv_width + 7) * layer.conv.shape[1] * 4
    assert cache.recording_nbytes() == 2 * (states + 7 * per_token + conv)
    cache.crop(0)
    assert cache.recording_nbytes() > 0  # tokens before the crop stay undoable, up to rollback_horizon


@pytest.mark.parametrize("name", list(STACKS))
def test_multi_token_decode_equals_single_steps(name):
    model = tiny_model(STACKS[name]).double()
    ids = prompt(2, 40, seed=47)
    with torch.no_grad():
        a, b = LinAttnCache(model.config), LinAttnCache(model.config)
        model(ids[:, :25], past_key_values=a, use_cache=True)
        model(ids[:, :25], past_key_values=b, use_cache=True)
        block = model(ids[:, 25:33], past_key_values=a, use_cache=True).logits
        singles = run(model, ids[:, 25:33], b, [1] * 8)
    assert_rel(block, singles, 1e-10, "logits")
    assert_same_cache(a, b, 1e-10)
