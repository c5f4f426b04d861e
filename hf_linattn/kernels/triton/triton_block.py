"""Block decode kernel: n >= 1 new tokens from a cached (S, R) in one launch, with the per-position record.

The GPU counterpart of ``block.py``'s ``block_residual_attention`` (decoding verification and cache
rollback) and of ``decode.py``'s ``decode_step`` (n = 1, no record). One program per (batch * head,
block of BV value columns) holds its columns of S and R ([K, BV] each, fp32; fp64 for fp64 inputs) in
registers and runs the spec's recurrence over the n tokens inside the kernel, as fla's fused_recurrent
kernels do: every column of the states evolves on its own (e = v - S~^T k is per column), so splitting
V across programs is exact. The state is read from and written to HBM once per block, which is what a
decode step costs; the n tokens add only [K, BV] register work each.

Besides o and the final state, the kernel writes what the ``BlockRecord`` of ``block.py`` keeps: the keys
k [B, H, n, K], the writes x (beta v, or beta e for the delta rule) and y (gamma r, or gamma (r - R~^T k)
for rdn) [B, H, n, V] in the state dtype, and the log-decays g [B, H, n] in fp64. The record rebuilds the
state after any accepted prefix exactly (``BlockRecord.state_after``), so rollback runs on GPU too.

Inputs in bf16/fp16 are converted to the state dtype on load (the interpreter computes bf16 wrongly, and
states are fp32 anyway). g = -inf is an exact reset (alpha = 0). Plain torch + triton; relative imports
only after flattening (also checkpoint remote code, where triton may be missing: the import below sits in
a try block so that transformers' remote-code import check skips it, and the ImportError still reaches the
guarded importer in ``ops.py``).
"""

from __future__ import annotations

try:  # skipped by transformers' remote-code import check: a checkpoint must load where triton is absent
    import triton
    import triton.language as tl
except ImportError:
    raise  # the importer (ops.py) catches it and keeps the torch path

import torch

from hf_linattn.kernels.block import BlockRecord
from hf_linattn.kernels.common import state_dtype
from hf_linattn.kernels.modes import is_delta, is_residual

MAX_BV = 8  # value columns per program (as fla's fused_recurrent): many programs keep a batch-1 decode busy


@triton.jit
def _block_decode_kernel(
    q, k, v, g, beta, gamma,  # inputs, [B, n, H, *] with any strides but a unit last stride
    alpha,  # exp(g) [B, n, H] from torch when GIVEN_ALPHA (fp64: no fp64 exp in the kernel), else unused
    s0, r0,  # entering states [B, H, K, V] contiguous (unused without HAS_S0 / HAS_R0)
    o,  # [B, n, H, V] contiguous, q's dtype
    s_out, r_out,  # final states [B, H, K, V] contiguous (unused without FINAL)
    rec_k, rec_x, rec_y, rec_g,  # the record: [B, H, n, K], [B, H, n, V] x2 in the state dtype, [B, H, n] fp64
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,  # strides of q, k, v (batch, token, head)
    sg_b, sg_t, sg_h, sb_b, sb_t, sb_h, sc_b, sc_t, sc_h, sa_b, sa_t, sa_h,  # strides of g, beta, gamma, alpha
    n, H, scale, clip,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
    DELTA: tl.constexpr, RESIDUAL: tl.constexpr, HAS_S0: tl.constexpr, HAS_R0: tl.constexpr,
    FINAL: tl.constexpr, RECORD: tl.constexpr, GIVEN_ALPHA: tl.constexpr,
):  # fmt: skip
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)  # int64 offsets: B * H * K * V may pass 2^31 elements
    i_b, i_h = i_bh // H, i_bh % H
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    mask_kv = mask_k[:, None] & mask_v[None, :]
    state_offs = i_bh * K * V + offs_k[:, None] * V + offs_v[None, :]

    S = tl.zeros([BK, BV], dtype=DT)
    if HAS_S0:
        S = tl.load(s0 + state_offs, mask=mask_kv, other=0).to(DT)
    R = tl.zeros([BK, BV], dtype=DT)
    if HAS_R0:
        R = tl.load(r0 + state_offs, mask=mask_kv, other=0).to(DT)

    p_q, p_k, p_v = q + i_b * sq_b + i_h * sq_h, k + i_b * sk_b + i_h * sk_h, v + i_b * sv_b + i_h * sv_h
    p_g, p_beta, p_gamma = g + i_b * sg_b + i_h * sg_h, beta + i_b * sb_b + i_h * sb_h, gamma + i_b * sc_b + i_h * sc_h
    p_alpha = alpha + i_b * sa_b + i_h * sa_h
    p_o = o + (i_b * n * H + i_h) * V + offs_v  # o is [B, n, H, V] contiguous
    p_rec = i_bh * n  # row of token 0 of this (b, h) in the record's [B * H * n, *] layout
    # Every token's inputs are loaded one iteration ahead (raw dtype, converted at use), so that their load
    # latency overlaps the previous token's math: a block of n tokens then costs little more than one step.
    # (gamma reads the beta pointer for gla/gdn: a valid address, never used.)
    q_next = tl.load(p_q + offs_k, mask=mask_k, other=0)
    k_next = tl.load(p_k + offs_k, mask=mask_k, other=0)
    v_next = tl.load(p_v + offs_v, mask=mask_v, other=0)
    g_next, beta_next, gamma_next = tl.load(p_g), tl.load(p_beta), tl.load(p_gamma)
    if GIVEN_ALPHA:
        alpha_next = tl.load(p_alpha)
    for t in range(n):
        b_q = q_next.to(DT) * scale
        b_k = k_next.to(DT)
        b_v = v_next.to(DT)
        g_raw, beta_t, gamma_t = g_next, beta_next.to(DT), gamma_next.to(DT)
        u = (t + 1) % n  # the next token (token 0 again after the last: loaded, never used)
        q_next = tl.load(p_q + u * sq_t + offs_k, mask=mask_k, other=0)
        k_next = tl.load(p_k + u * sk_t + offs_k, mask=mask_k, other=0)
        v_next = tl.load(p_v + u * sv_t + offs_v, mask=mask_v, other=0)
        g_next, beta_next, gamma_next = tl.load(p_g + u * sg_t), tl.load(p_beta + u * sb_t), tl.load(p_gamma + u * sc_t)
        if GIVEN_ALPHA:
            decay = alpha_next.to(DT)
            alpha_next = tl.load(p_alpha + u * sa_t)
        else:
            decay = tl.exp(g_raw.to(DT))  # 0 for g = -inf: an exact reset of both states

        S = S * decay  # S~: history is decayed before it predicts
        e = b_v - tl.sum(S * b_k[:, None], axis=0)  # [BV]
        if RESIDUAL:
            o_t = tl.sum(S * b_q[:, None], axis=0)  # residual modes read S~ (before the token writes)
        if DELTA:  # noqa: SIM108 (a constexpr branch: the other one is never compiled)
            x = beta_t * e
        else:
            x = beta_t * b_v
        S += b_k[:, None] * x[None, :]
        if RESIDUAL:
            R = R * decay
            r = tl.minimum(tl.maximum(e, -clip), clip)
            if DELTA:  # R is a second delta rule whose values are r
                r = r - tl.sum(R * b_k[:, None], axis=0)
            y = gamma_t * r
            R += b_k[:, None] * y[None, :]
            o_t += gamma_t * tl.sum(R * b_q[:, None], axis=0)
        else:
            o_t = tl.sum(S * b_q[:, None], axis=0)
        tl.store(p_o + t * H * V, o_t.to(o.dtype.element_ty), mask=mask_v)

        if RECORD:
            row = p_rec + t
            tl.store(rec_x + row * V + offs_v, x, mask=mask_v)
            if RESIDUAL:
                tl.store(rec_y + row * V + offs_v, y, mask=mask_v)
            # keys and decays once per (b, h): the program of the first value block writes them
            if i_v == 0:
                tl.store(rec_k + row * K + offs_k, b_k, mask=mask_k)
                tl.store(rec_g + row, g_raw.to(tl.float64))

    if FINAL:
        tl.store(s_out + state_offs, S, mask=mask_kv)
        if RESIDUAL:
            tl.store(r_out + state_offs, R, mask=mask_kv)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim is contiguous (the kernel takes the other strides as they are)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(q, k, v, g, beta, gamma, mode, clip, scale, initial_state, output_final_state, record):
    """Shared launcher: inputs [B, n, H, *] (gates [B, n, H]); returns o, (S, R) or None, BlockRecord or None."""
    B, n, H, K = q.shape
    if n == 0:  # the kernel reads token 0 ahead of the loop
        raise ValueError("a block needs n >= 1 tokens")
    V = v.shape[-1]
    dt = state_dtype(q.dtype)
    delta, residual = is_delta(mode), is_residual(mode)
    S0, R0 = initial_state if initial_state is not None else (None, None)
    S0 = S0.to(dt) if S0 is not None else None
    R0 = R0.to(dt) if residual and R0 is not None else None
    q, k, v, g, beta = (_unit_last(x) for x in (q, k, v, g[..., None], beta[..., None]))
    gamma = _unit_last(gamma[..., None]) if residual else beta  # (a placeholder pointer when unused)
    given_alpha = dt == torch.float64  # fp64 exp is left to torch (not every GPU backend lowers it)
    alpha = g.to(dt).exp() if given_alpha else g  # [B, n, H, 1]; exp(-inf) = 0
    device = q.device

    o = torch.empty(B, n, H, V, dtype=q.dtype, device=device)
    S = torch.empty(B, H, K, V, dtype=dt, device=device) if output_final_state else None
    R = torch.empty(B, H, K, V, dtype=dt, device=device) if output_final_state and residual else None
    rec_k = torch.empty(B, H, n, K, dtype=dt, device=device) if record else None
    rec_x = torch.empty(B, H, n, V, dtype=dt, device=device) if record else None
    rec_y = torch.empty(B, H, n, V, dtype=dt, device=device) if record and residual else None
    rec_g = torch.empty(B, H, n, dtype=torch.float64, device=device) if record else None

    def ptr(x: torch.Tensor | None) -> torch.Tensor:  # unused pointer arguments get a real tensor all the same
        return o if x is None else x

    BV = min(triton.next_power_of_2(V), MAX_BV)
    grid = (triton.cdiv(V, BV), B * H)
    s0_in = S0.contiguous() if S0 is not None else None
    r0_in = R0.contiguous() if R0 is not None else None
    _block_decode_kernel[grid](
        q, k, v, g, beta, gamma, alpha, ptr(s0_in), ptr(r0_in), o, ptr(S), ptr(R),
        ptr(rec_k), ptr(rec_x), ptr(rec_y), ptr(rec_g),
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *g.stride()[:3], *beta.stride()[:3], *gamma.stride()[:3],
        *alpha.stride()[:3],
        n, H, float(scale), float(clip),
        K=K, V=V, BK=triton.next_power_of_2(K), BV=BV, DT=tl.float64 if dt == torch.float64 else tl.float32,
        DELTA=delta, RESIDUAL=residual, HAS_S0=S0 is not None, HAS_R0=R0 is not None,
        FINAL=output_final_state, RECORD=record, GIVEN_ALPHA=given_alpha, num_warps=1,
    )  # fmt: skip
    final = (S, R) if output_final_state else None
    block_record = BlockRecord(S0, R0, rec_k, rec_x, rec_y, rec_g) if record else None
    return o, final, block_record


def block_residual_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor | None,
    mode: str,
    clip: float,
    scale: float,
    initial_state: tuple[torch.Tensor | None, torch.Tensor | None] | None,
    output_final_state: bool,
    *,
    record: bool = True,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None] | None, BlockRecord | None]:
    """``block.py``'s ``block_residual_attention`` as one kernel launch (no autograd: decoding runs under no_grad).

    q, k: [B, n, H, K]; v: [B, n, H, V]; g, beta, gamma: [B, n, H] (gamma None for gla/gdn; g may be
    -inf); initial_state: (S0, R0), each [B, H, K, V] or None, or None. Not validated (as every backend).
    Returns o [B, n, H, V] in q's dtype, (S, R) in fp32 (fp64 for fp64 inputs; R None for gla/gdn) if
    ``output_final_state`` else None, and the block's ``BlockRecord`` (None when ``record`` is False).
    """
    return _launch(q, k, v, g, beta, gamma, mode, clip, scale, initial_state, output_final_state, record)


def decode_step_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor | None,
    *,
    mode: str,
    clip: float,
    scale: float,
    state: tuple[torch.Tensor | None, torch.Tensor | None],
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]]:
    """``decode.py``'s ``decode_step`` as one fused kernel: q, k [B, H, K]; v [B, H, V]; g, beta, gamma [B, H].

    Returns o [B, H, V] in ``out_dtype`` (default q's dtype) and the new (S, R) (R None for gla/gdn).
    """
    o, final, _ = _launch(
        q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], None if gamma is None else gamma[:, None],
        mode, clip, scale, state, True, False,
    )  # fmt: skip
    o = o[:, 0]
    return (o if out_dtype is None or o.dtype == out_dtype else o.to(out_dtype)), final


__all__ = ["block_residual_attention_triton", "decode_step_triton"]
