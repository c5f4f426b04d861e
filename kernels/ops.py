"""``residual_attention``: the one functional entry point of the op family (the spec's contract).

It validates arguments once, resolves defaults (scale, states) and dispatches to a backend:
"recurrent" (token-by-token reference), "torch" (chunked, the CPU default) or "triton"
(GPU kernels). Every backend takes the same arguments in the same order.
This file imports nothing from hf_linattn by name (it is also checkpoint remote code).
"""

from __future__ import annotations

import importlib

import torch

from .chunked import chunked_residual_attention
from .modes import MODES, is_residual
from .recurrent import recurrent_residual_attention

BACKENDS = ("auto", "recurrent", "torch", "triton")


def _check_shapes(q, k, v, g, beta, gamma, mode, initial_state) -> None:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, K]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] with B, T, H = {(B, T, H)}; got {tuple(v.shape)}")
    gates = {"g": g, "beta": beta} | ({"gamma": gamma} if is_residual(mode) else {})
    for name, x in gates.items():
        if x is None or x.shape != (B, T, H):
            shape = None if x is None else tuple(x.shape)
            raise ValueError(f"{name} must be [B, T, H] = {(B, T, H)} for mode {mode!r}; got {shape}")
    if not is_residual(mode) and gamma is not None:
        raise ValueError(f"gamma must be None for mode {mode!r}: it has no residual state")
    if initial_state is None:
        return
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
        raise ValueError("initial_state must be a pair (S0, R0), each [B, H, K, V] or None")
    state_shape = (B, H, K, v.shape[-1])
    for name, x in zip(("S0", "R0"), initial_state):
        if x is not None and tuple(x.shape) != state_shape:
            raise ValueError(f"{name} must be [B, H, K, V] = {state_shape}; got {tuple(x.shape)}")
    if not is_residual(mode) and initial_state[1] is not None:
        raise ValueError(f"R0 must be None for mode {mode!r}: it has no residual state")


def residual_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor | None = None,
    mode: str = "rdn",
    clip: float = 1.0,
    scale: float | None = None,
    initial_state: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None] | None]:
    """Gated (residual) linear attention over a sequence.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; any float dtype. q and k are used as given.
        g: [B, T, H] log-decay (<= 0). beta: [B, T, H] base write strength in (0, 1).
        gamma: [B, T, H] residual write strength in (0, 1); None for gla/gdn.
        mode: "gla" | "gdn" | "rla" | "rdn".
        clip: bound c of the clipped residual r = clamp(e, -c, c) (residual modes).
        scale: multiplies q; defaults to K ** -0.5.
        initial_state: (S0, R0), each [B, H, K, V] or None; R0 is None for gla/gdn.
        output_final_state: also return the final (S, R).
        backend: "auto" (triton on CUDA tensors, torch otherwise), "recurrent", "torch", "triton".

    Returns:
        o: [B, T, H, V] in q's dtype, and (S, R) in fp32 (fp64 for fp64 inputs; R is None
        for gla/gdn) if ``output_final_state``, else None.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if not clip > 0:
        raise ValueError(f"clip must be > 0; got {clip}")
    _check_shapes(q, k, v, g, beta, gamma, mode, initial_state)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if not is_residual(mode):
        gamma = None
    state = tuple(initial_state) if initial_state is not None else (None, None)
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    if backend == "triton":
        fn = _triton_backend()
    elif backend == "recurrent":
        fn = recurrent_residual_attention
    else:
        fn = chunked_residual_attention
    return fn(q, k, v, g, beta, gamma, mode, clip, scale, state, output_final_state)


def _triton_backend():
    """The Triton kernels ship with the hf_linattn package only (not in checkpoint remote code)."""
    try:
        module = importlib.import_module("hf_linattn.kernels.triton")
    except ImportError as err:
        raise NotImplementedError(
            "backend='triton' needs the hf_linattn package (pip install hf-linattn[gpu]); "
            "use backend='torch' instead"
        ) from err
    return module.triton_residual_attention
