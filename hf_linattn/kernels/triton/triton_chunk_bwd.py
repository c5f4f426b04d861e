"""Chunked backward of residual linear attention in Triton: one fused kernel, chunks in reverse.

One program per (sequence x head, V-tile), like the forward. It walks its chunks from the last to
the first, carrying dS (and dR) in registers, and per chunk recomputes what the forward computed
from the chunk's entering states (stored by the forward with ``store_states``) and the forward's
inverses T1, T2: decays, e, the clipped r and the residual pass. Then it runs the chain rule
backwards through, in order,

    R' = exp(b_C) R + (K exp(b_C - b) gamma)^T w2,  o2 = Gamma Q R + (Q K^T * D)(gamma w2)
    w2 = solve(I + A diag(gamma), r - Gamma K R)    (rdn; rla: w2 = r)
    r  = clamp(e, -clip, clip)                       (gradient passes where |e| <= clip, as torch.clamp)
    S' = exp(b_C) S + (K exp(b_C - b) beta)^T w1,   o1 = Gamma Q S + (Q K^T * D)(beta w1)
    e  = solve(I + A diag(beta), V - Gamma K S)      (delta; gla: e = V - Gamma K S - A (beta V))

where x = (I + L)^-1 y has dy = (I + L)^-T dx and dL = -dy x^T (strictly lower part),
and finally through the decays into g (dg_t = sum over u >= t of db_u; zero where g = -inf).
Value columns are independent, but dq, dk, dg, dbeta, dgamma sum over them: each V-tile writes
its partial sums to a [NV, ...] buffer that the launcher adds up (one tile when V <= BV).
"""

from __future__ import annotations

import torch

from .triton_chunk_fwd import LAUNCH, _chunk_decays, dot_precision, key_tile

try:
    import triton
    import triton.language as tl
except ImportError as err:  # raised where this module is imported; dispatch decides what that means
    raise ImportError(f"the Triton chunk kernels need the triton package ({err})") from err


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _chunk_bwd_kernel(
    q, k, v, g, beta, gamma, states_s, states_r, t1, t2, do, ds_final, dr_final, cu_seqlens, chunk_offsets,
    dq, dk, dv, dg, dbeta, dgamma, ds0, dr0,
    scale, clip, T, NT, n_tokens,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DELTA: tl.constexpr, RESIDUAL: tl.constexpr, HAS_DS: tl.constexpr, HAS_DR: tl.constexpr,
    IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    i_nh, i_v = tl.program_id(0), tl.program_id(1)  # sequences x heads on axis 0 (axis 1 stops at 65535)
    i_n, i_h = i_nh // H, i_nh % H
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
        chunk_base = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        seq_len = bos * 0 + T
        chunk_base = i_n.to(tl.int64) * NT
    rows = tl.arange(0, C)
    strict = rows[:, None] > rows[None, :]
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_state = m_k[:, None] & m_v[None, :]
    state_off = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    # this tile's partial sums of dq, dk [NV, tokens, H, K] and of the gates [NV, tokens, H]
    part_k = i_v.to(tl.int64) * n_tokens * H * K
    part_g = i_v.to(tl.int64) * n_tokens * H

    if HAS_DS:
        dS = tl.load(ds_final + state_off, mask=m_state, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
    if RESIDUAL:
        if HAS_DR:
            dR = tl.load(dr_final + state_off, mask=m_state, other=0.0).to(tl.float32)
        else:
            dR = tl.zeros([BK, BV], dtype=tl.float32)

    n_chunks = (seq_len + C - 1) // C
    for j in range(0, n_chunks):
        i_c = n_chunks - 1 - j
        t_in = i_c * C + rows
        valid = t_in < seq_len
        tok = bos + t_in
        m_qk = valid[:, None] & m_k[None, :]
        m_vv = valid[:, None] & m_v[None, :]
        qk_off = (tok[:, None] * H + i_h) * K + o_k[None, :]
        v_off = (tok[:, None] * H + i_h) * V + o_v[None, :]
        b_q = tl.load(q + qk_off, mask=m_qk, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + qk_off, mask=m_qk, other=0.0).to(tl.float32)
        b_v = tl.load(v + v_off, mask=m_vv, other=0.0).to(tl.float32)
        b_do = tl.load(do + v_off, mask=m_vv, other=0.0).to(tl.float32)
        b_g = tl.load(g + tok * H + i_h, mask=valid, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + tok * H + i_h, mask=valid, other=0.0).to(tl.float32)
        slot = (chunk_base + i_c) * H + i_h  # this chunk and head in the per-chunk buffers
        chunk_off = slot * K * V + o_k[:, None] * V + o_v[None, :]
        t_off = slot * C * C + rows[:, None] * C + rows[None, :]
        S = tl.load(states_s + chunk_off, mask=m_state, other=0.0)

        # recompute the chunk's forward
        reset, decay, growth, to_end, chunk_decay = _chunk_decays(b_g, C)
        qk_raw = _dot(b_q, tl.trans(b_k), PRECISION)
        kk_raw = _dot(b_k, tl.trans(b_k), PRECISION)
        qk = qk_raw * decay
        kk = tl.where(strict, kk_raw * decay, 0.0)
        q_g = b_q * growth[:, None]
        k_g = b_k * growth[:, None]
        pred = b_v - _dot(k_g, S, PRECISION)
        if DELTA:
            b_t1 = tl.load(t1 + t_off)  # (I + A diag(beta))^-1
            e = _dot(b_t1, pred, PRECISION)
            w1 = e
        else:
            w1 = b_v
            if RESIDUAL:
                e = pred - _dot(kk, b_v * b_beta[:, None], PRECISION)

        d_qg = tl.zeros([C, BK], dtype=tl.float32)
        d_kg = tl.zeros([C, BK], dtype=tl.float32)
        d_k = tl.zeros([C, BK], dtype=tl.float32)
        d_qk = tl.zeros([C, C], dtype=tl.float32)  # gradient of Q K^T * D (the decayed product)
        d_kk = tl.zeros([C, C], dtype=tl.float32)  # gradient of A (strictly lower part used)
        d_beta = tl.zeros([C], dtype=tl.float32)
        d_to_end = tl.zeros([C], dtype=tl.float32)

        if RESIDUAL:  # pass 2, backwards
            R = tl.load(states_r + chunk_off, mask=m_state, other=0.0)
            b_gamma = tl.load(gamma + tok * H + i_h, mask=valid, other=0.0).to(tl.float32)
            r = tl.minimum(tl.maximum(e, -clip), clip)
            if DELTA:
                b_t2 = tl.load(t2 + t_off)  # (I + A diag(gamma))^-1
                w2 = _dot(b_t2, r - _dot(k_g, R, PRECISION), PRECISION)
            else:
                w2 = r
            o2 = _dot(q_g, R, PRECISION) + _dot(qk, w2 * b_gamma[:, None], PRECISION)
            d_gamma = tl.sum(b_do * o2, axis=1)
            d_o2 = b_do * b_gamma[:, None]
            # R' = exp(b_C) R + k_w2^T w2, k_w2 = K * to_end * gamma
            d_cd = tl.sum(tl.sum(R * dR, axis=1), axis=0)
            k_w2 = b_k * (to_end * b_gamma)[:, None]
            d_w2 = _dot(k_w2, dR, PRECISION)
            d_kw2 = _dot(w2, tl.trans(dR), PRECISION)
            dkw2_k = tl.sum(d_kw2 * b_k, axis=1)
            d_k += d_kw2 * (to_end * b_gamma)[:, None]
            d_to_end += dkw2_k * b_gamma
            d_gamma += dkw2_k * to_end
            dR_prev = dR * chunk_decay + _dot(tl.trans(q_g), d_o2, PRECISION)
            # o2 = Gamma Q R + qk (gamma w2)
            d_qg += _dot(d_o2, tl.trans(R), PRECISION)
            d_qk += _dot(d_o2, tl.trans(w2 * b_gamma[:, None]), PRECISION)
            qtd = _dot(tl.trans(qk), d_o2, PRECISION)
            d_w2 += b_gamma[:, None] * qtd
            d_gamma += tl.sum(w2 * qtd, axis=1)
            if DELTA:  # w2 = solve(I + A diag(gamma), r - Gamma K R)
                d_rhs2 = _dot(tl.trans(b_t2), d_w2, PRECISION)
                d_l2 = -_dot(d_rhs2, tl.trans(w2), PRECISION)
                d_kk += d_l2 * b_gamma[None, :]
                d_gamma += tl.sum(d_l2 * kk, axis=0)
                d_r = d_rhs2
                d_kg -= _dot(d_rhs2, tl.trans(R), PRECISION)
                dR_prev -= _dot(tl.trans(k_g), d_rhs2, PRECISION)
            else:
                d_r = d_w2
            d_e = tl.where(tl.abs(e) <= clip, d_r, 0.0)  # the clip passes the gradient inside [-clip, clip]
            dR = dR_prev
            d_cd += tl.sum(tl.sum(S * dS, axis=1), axis=0)
        else:
            d_cd = tl.sum(tl.sum(S * dS, axis=1), axis=0)

        # pass 1, backwards: S' = exp(b_C) S + k_w1^T w1, o1 = Gamma Q S + attn1 (beta w1)
        k_w1 = b_k * (to_end * b_beta)[:, None]
        d_w1 = _dot(k_w1, dS, PRECISION)
        d_kw1 = _dot(w1, tl.trans(dS), PRECISION)
        dkw1_k = tl.sum(d_kw1 * b_k, axis=1)
        d_k += d_kw1 * (to_end * b_beta)[:, None]
        d_to_end += dkw1_k * b_beta
        d_beta += dkw1_k * to_end
        dS_prev = dS * chunk_decay + _dot(tl.trans(q_g), b_do, PRECISION)
        d_qg += _dot(b_do, tl.trans(S), PRECISION)
        d_attn1 = _dot(b_do, tl.trans(w1 * b_beta[:, None]), PRECISION)
        if RESIDUAL:  # noqa: SIM108 (the base output of residual modes reads S~_t: strictly causal)
            attn_mask = strict
        else:
            attn_mask = rows[:, None] >= rows[None, :]
        attn1 = tl.where(attn_mask, qk, 0.0)
        d_qk += tl.where(attn_mask, d_attn1, 0.0)
        atd = _dot(tl.trans(attn1), b_do, PRECISION)
        d_w1 += b_beta[:, None] * atd
        d_beta += tl.sum(w1 * atd, axis=1)
        if DELTA:  # e = w1 = solve(I + A diag(beta), V - Gamma K S)
            if RESIDUAL:
                d_w1 += d_e
            d_pred = _dot(tl.trans(b_t1), d_w1, PRECISION)
            d_l1 = -_dot(d_pred, tl.trans(e), PRECISION)
            d_kk += d_l1 * b_beta[None, :]
            d_beta += tl.sum(d_l1 * kk, axis=0)
            d_vv = d_pred
            d_kg -= _dot(d_pred, tl.trans(S), PRECISION)
            dS_prev -= _dot(tl.trans(k_g), d_pred, PRECISION)
        else:
            d_vv = d_w1
            if RESIDUAL:  # e = V - Gamma K S - A (beta V)
                ktd = _dot(tl.trans(kk), d_e, PRECISION)
                d_vv += d_e - b_beta[:, None] * ktd
                d_beta -= tl.sum(b_v * ktd, axis=1)
                d_kk -= _dot(d_e, tl.trans(b_v * b_beta[:, None]), PRECISION)
                d_kg -= _dot(d_e, tl.trans(S), PRECISION)
                dS_prev -= _dot(tl.trans(k_g), d_e, PRECISION)
        dS = dS_prev

        # through the products and the decays
        d_kk = tl.where(strict, d_kk, 0.0)
        d_qk_m = d_qk * decay
        d_kk_m = d_kk * decay
        b_dq = _dot(d_qk_m, b_k, PRECISION) + d_qg * growth[:, None]
        d_k += _dot(tl.trans(d_qk_m), b_q, PRECISION) + _dot(d_kk_m + tl.trans(d_kk_m), b_k, PRECISION)
        d_k += d_kg * growth[:, None]
        d_growth = tl.sum(d_qg * b_q, axis=1) + tl.sum(d_kg * b_k, axis=1)
        d_dec = (d_qk * qk_raw + d_kk * kk_raw) * decay  # d decay * decay: d/db of exp(b_t - b_s)
        d_b = tl.sum(d_dec, axis=1) - tl.sum(d_dec, axis=0) + d_growth * growth - d_to_end * to_end
        d_b_end = tl.sum(d_to_end * to_end, axis=0) + d_cd * chunk_decay  # b_C sums every g of the chunk
        d_b += tl.where(rows == C - 1, d_b_end, 0.0)
        d_gg = tl.sum(tl.where(rows[None, :] >= rows[:, None], d_b[None, :], 0.0), axis=1)  # sum over u >= t
        d_gg = tl.where(reset, 0.0, d_gg)

        tl.store(dq + part_k + qk_off, b_dq * scale, mask=m_qk)
        tl.store(dk + part_k + qk_off, d_k, mask=m_qk)
        tl.store(dv + v_off, d_vv.to(dv.dtype.element_ty), mask=m_vv)
        tl.store(dg + part_g + tok * H + i_h, d_gg, mask=valid)
        tl.store(dbeta + part_g + tok * H + i_h, d_beta, mask=valid)
        if RESIDUAL:
            tl.store(dgamma + part_g + tok * H + i_h, d_gamma, mask=valid)

    tl.store(ds0 + state_off, dS, mask=m_state)
    if RESIDUAL:
        tl.store(dr0 + state_off, dR, mask=m_state)


def chunk_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor | None,
    aux: dict,
    do: torch.Tensor,
    dS: torch.Tensor | None,
    dR: torch.Tensor | None,
    *,
    delta: bool,
    residual: bool,
    clip: float,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, ...]:
    """Gradients (dq, dk, dv, dg, dbeta, dgamma, dS0, dR0) in fp32, shaped as the inputs and states.

    ``aux``: what ``chunk_forward(..., store_states=True)`` returned (layout, inverses, states);
    do [B, T, H, V]; dS, dR: gradients of the final states [N, H, K, V] or None (zero). dgamma and
    dR0 are None unless ``residual``.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BK = key_tile(K)
    # more tiles live here than in the forward: narrower value tiles
    BV = max(16, min(triton.next_power_of_2(V), 32 if BK <= 64 else 16))
    NV = triton.cdiv(V, BV)
    layout = aux["layout"]
    f32 = {"dtype": torch.float32, "device": q.device}
    dq, dk = torch.empty(NV, B, T, H, K, **f32), torch.empty(NV, B, T, H, K, **f32)
    dv = torch.empty(B, T, H, V, **f32)
    dg, dbeta = torch.empty(NV, B, T, H, **f32), torch.empty(NV, B, T, H, **f32)
    dgamma = torch.empty(NV, B, T, H, **f32) if residual else None
    dS0 = torch.empty(N, H, K, V, **f32)
    dR0 = torch.empty_like(dS0) if residual else None
    states_s, states_r = aux["states"]
    t1, t2 = aux["inverses"] or (states_s, None)
    if N * H == 0:
        return dq.sum(0), dk.sum(0), dv, dg.sum(0), dbeta.sum(0), None if dgamma is None else dgamma.sum(0), dS0, dR0
    _chunk_bwd_kernel[(N * H, NV)](
        q, k, v, g, beta, gamma if residual else beta, states_s, states_r if residual else states_s,
        t1, t2 if t2 is not None else t1,
        do.contiguous(), dS.contiguous() if dS is not None else dS0, dR.contiguous() if dR is not None else dS0,
        cu_seqlens if cu_seqlens is not None else q, layout["offsets"] if cu_seqlens is not None else q,
        dq, dk, dv, dg, dbeta, dgamma if residual else dg, dS0, dR0 if residual else dS0,
        scale, clip, T, layout["NT"], B * T,
        H=H, K=K, V=V, C=chunk_size, BK=BK, BV=BV, DELTA=delta, RESIDUAL=residual,
        HAS_DS=dS is not None, HAS_DR=residual and dR is not None, IS_VARLEN=cu_seqlens is not None,
        PRECISION=dot_precision(q.dtype), **LAUNCH,
    )  # fmt: skip
    return (
        dq.sum(0), dk.sum(0), dv, dg.sum(0), dbeta.sum(0), dgamma.sum(0) if residual else None, dS0, dR0,
    )  # fmt: skip
