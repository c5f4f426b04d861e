"""Gate values through the public ``residual_attention``: one clear ValueError, legal edges pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hf_linattn.kernels.ops as ops
from hf_linattn.kernels import MODES, is_delta, is_residual, residual_attention

from .test_residual_attention import make_inputs, rel_err, run

NAN, NEG_INF = float("nan"), float("-inf")


def call(mode, change=None, seed=40, T=6):
    q, k, v, g, beta, gamma, *_ = make_inputs(mode, T=T, dtype=torch.float32, seed=seed)
    kwargs = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "gamma": gamma, "mode": mode}
    for name, fn in (change or {}).items():
        kwargs[name] = fn(kwargs[name].clone())
    return residual_attention(**kwargs)


def put(index, value):
    """x -> x with x[index] = value."""

    def fn(x):
        x[index] = value
        return x

    return fn


G_MSG = r"g must be <= 0 \(alpha = exp\(g\) <= 1; -inf is allowed\)"


@pytest.mark.parametrize(
    ("mode", "change", "message"),
    [
        ("gla", {"g": put((0, 2, 1), 0.5)}, G_MSG + ".*max g = 0.5"),
        ("rdn", {"g": put((1, 0, 0), NAN)}, G_MSG + ".*max g = nan"),
        ("gdn", {"g": put((1, 0, 0), float("inf"))}, G_MSG),
        ("gla", {"beta": put((0, 1, 2), 1.5)}, r"beta must be in \[0, 1\].*max 1.5"),
        ("rla", {"beta": put((0, 1, 2), -0.25)}, r"beta must be in \[0, 1\].*min -0.25"),
        ("gdn", {"beta": put((1, 5, 0), NAN)}, r"beta must be in \[0, 1\] and not NaN"),
        ("rla", {"gamma": put((0, 3, 1), 1.01)}, r"gamma must be in \[0, 1\].*max 1.01"),
        ("rdn", {"gamma": put((0, 3, 1), NAN)}, r"gamma must be in \[0, 1\] and not NaN"),
    ],
)
def test_gate_out_of_range_is_one_clear_error(mode, change, message):
    with pytest.raises(ValueError, match=message):
        call(mode, change)


@pytest.mark.parametrize("mode", ["gdn", "rdn"])
def test_delta_rule_needs_bounded_beta_times_key_norm(mode):
    """||k|| = 2 with beta up to 0.95: beta * ||k||^2 up to 3.8 > 2, where the delta rule diverges."""
    with pytest.raises(ValueError, match=r"needs beta \* \|\|k\|\|\^2 <= 2.*max beta \* \|\|k\|\|\^2 = 3\.\d+.*"
                                          r"L2-normalized"):  # fmt: skip
        call(mode, {"k": lambda k: 2 * k})


def test_delta_rule_bound_holds_for_the_residual_state_too():
    """rdn: beta * ||k||^2 within the bound but gamma * ||k||^2 not."""
    change = {"k": lambda k: 1.5 * k, "beta": lambda b: b.clamp(max=0.5), "gamma": put((1, 2, 2), 1.0)}
    with pytest.raises(ValueError, match=r"needs gamma \* \|\|k\|\|\^2 <= 2.*= 2\.25"):
        call("rdn", change)


@pytest.mark.parametrize("mode", ["gla", "rla"])
def test_no_key_norm_bound_without_delta_rule(mode):
    o, _ = call(mode, {"k": lambda k: 3 * k})
    assert torch.isfinite(o).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_legal_edge_values_pass(mode, dtype):
    """beta and gamma in {0, 1}, g in {0, -inf}, unit-norm k: accepted, and both paths agree."""
    inputs = make_inputs(mode, T=100, dtype=torch.float64, seed=41)
    gen = torch.Generator().manual_seed(42)
    pick = torch.randint(0, 4, inputs[3].shape, generator=gen)
    inputs[3] = torch.where(pick == 0, 0.0, torch.where(pick == 1, NEG_INF, inputs[3]))  # g
    inputs[4] = torch.where(pick == 2, 1.0, torch.where(pick == 3, 0.0, inputs[4]))  # beta
    if is_residual(mode):
        inputs[5] = torch.where(pick == 1, 1.0, torch.where(pick == 0, 0.0, inputs[5]))  # gamma
    inputs[1] = F.normalize(inputs[1].to(dtype).double(), dim=-1)  # unit norm after rounding to dtype
    inputs = [None if t is None else t.to(dtype) for t in inputs]
    if is_delta(mode) and dtype == torch.bfloat16:
        worst = (inputs[1].double().square().sum(-1) * inputs[4].double()).max().item()
        assert 1 < worst < ops.DELTA_BOUND  # rounding puts some keys just above norm 1: the slack is needed
    o, (S, _) = run(inputs, mode, "torch")
    o_ref, (S_ref, _) = run(inputs, mode, "recurrent")
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    tol = 1e-10 if dtype == torch.float64 else 1e-2
    assert rel_err(o, o_ref) < tol and rel_err(S, S_ref) < tol


def test_value_checks_cost_one_host_sync(monkeypatch):
    _, k, _, g, beta, gamma, *_ = make_inputs("rdn", T=6, dtype=torch.float32, seed=43)
    syncs = []
    real_tolist = torch.Tensor.tolist

    def no_sync(*args):
        raise AssertionError("a second kind of host sync")

    monkeypatch.setattr(torch.Tensor, "tolist", lambda x: syncs.append(1) or real_tolist(x))
    for method in ("item", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, method, no_sync)
    ops._check_values(k, g, beta, gamma, "rdn")
    assert syncs == [1]


def test_value_checks_skipped_while_compiling(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    o, _ = call("gla", {"g": put((0, 0, 0), 0.5)})  # would be refused outside torch.compile
    assert o.shape[1] == 6
