"""Chunked forward of residual linear attention in Triton: both passes per chunk in one sequential kernel.

Two launches. ``_chunk_inverse_kernel`` (one program per chunk and head, all in parallel) builds
what does not depend on the states: T1 = (I + A diag(beta))^-1 and, for rdn, T2 = (I + A diag(gamma))^-1,
[slots, H, C, C] fp32, by forward substitution over the rows of the [C, C] tile (row i of a
register tile is taken with a masked sum: tiles cannot be indexed by a loop variable).
Then ``_chunk_fwd_kernel``: one program per (sequence x head, V-tile) walks the chunks of its
sequence in order, keeping the base state S (and, for rla/rdn, the residual state R) as fp32
[BK, BV] tiles in registers. Value columns never interact (errors, clip and both states are
column-wise), so V is tiled; K is whole. Per chunk of C tokens, with b the chunk-local cumulative
log-decay, D_ts = exp(b_t - b_s) (s <= t), Gamma = diag(exp(b)) and A = strictly-lower(K K^T * D)
(the algebra of ``chunked.py``):

    e   = T1 (V - Gamma K S)                         (delta rule; gla: V - Gamma K S - A (beta V))
    o1  = Gamma Q S + (Q K^T * D) (beta x)           (x = e or v; strictly causal in residual modes)
    S  <- exp(b_C) S + (K * exp(b_C - b) * beta)^T x

and for the residual modes the same pass again on r = clamp(e, -clip, clip) with strength gamma
and state R (rdn: w2 = T2 (r - Gamma K R)), added as o = o1 + gamma * o2. The error e of pass 1
never leaves registers.

g = -inf is an exact reset: b sums the finite g only, a running count n of resets marks segments,
and every decay between different segments is exp(-inf) = 0. Every exponent is <= 0.
Varlen (``cu_seqlens``, batch 1): a program's sequence is tokens [bos, eos) and its initial and
final states are row n of [N, H, K, V]. Kernels load any float dtype and compute in fp32 at once
(the interpreter computes bf16 wrongly); the output is stored in its tensor's dtype.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as err:  # raised where this module is imported; dispatch decides what that means
    raise ImportError(f"the Triton chunk kernels need the triton package ({err})") from err


# Launch settings of the sequential kernels. One stage: their loops carry many live tiles, and multi-buffered
# loads would add shared memory without much to overlap with. Measured on an H100 (triton 3.6, gdn/rdn fwd+bwd,
# T=8K, H=16, K=V=128): 2 stages gain nothing; num_warps=8 raised "illegal memory access" there, not yet
# investigated (the interpreter cannot show it), so keep 4 until a GPU session finds why.
LAUNCH = {"num_warps": 4, "num_stages": 1}


@triton.jit
def _solve_unit_lower(lower, rhs, C: tl.constexpr):
    """x with (I + lower) x = rhs; lower [C, C] strictly lower, rhs [C, BV]; forward substitution."""
    rows = tl.arange(0, C)
    x = rhs
    for i in range(1, C):
        l_i = tl.sum(tl.where(rows[:, None] == i, lower, 0.0), axis=0)  # row i of lower, over columns j < i
        x = tl.where(rows[:, None] == i, x - tl.sum(l_i[:, None] * x, axis=0)[None, :], x)
    return x


@triton.jit
def _chunk_decays(b_g, C: tl.constexpr):
    """Decays of one chunk from its log-decays b_g [C] (-inf: reset; padding: 0).

    Returns (reset [C], decay [C, C] = exp(b_t - b_s) for s <= t in one segment else 0,
    growth [C] = exp(b_t) before the first reset else 0, to_end [C] = exp(b_C - b_t) after the last
    reset else 0, chunk_decay = exp(b_C) or 0). A reset adds 0 to b and 1 to the segment count n.
    """
    rows = tl.arange(0, C)
    reset = b_g == float("-inf")
    g_fin = tl.where(reset, 0.0, b_g)
    b_b = tl.cumsum(g_fin, axis=0)
    b_n = tl.cumsum(reset.to(tl.int32), axis=0)
    b_last = tl.sum(g_fin, axis=0)  # b at the chunk's end (padding has g = 0)
    n_last = tl.sum(reset.to(tl.int32), axis=0)
    same = (rows[:, None] >= rows[None, :]) & (b_n[:, None] == b_n[None, :])
    decay = tl.exp(tl.where(same, b_b[:, None] - b_b[None, :], float("-inf")))
    growth = tl.exp(tl.where(b_n == 0, b_b, float("-inf")))
    to_end = tl.exp(tl.where(b_n == n_last, b_last - b_b, float("-inf")))
    chunk_decay = tl.sum(tl.where(rows == C - 1, growth, 0.0), axis=0)
    return reset, decay, growth, to_end, chunk_decay


@triton.jit
def _chunk_inverse_kernel(
    k, g, beta, gamma, t1, t2, cu_seqlens, chunk_offsets, chunk_seq, T, NT,
    H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
    RESIDUAL: tl.constexpr, IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """T1 = (I + A diag(beta))^-1 (and T2 = (I + A diag(gamma))^-1 for rdn) of one chunk slot and head.

    They do not depend on the states, so every chunk is done in parallel here and the sequential
    kernels only multiply. Slots past a sequence's chunks (varlen bound) get the identity.
    """
    i_slot, i_h = tl.program_id(0), tl.program_id(1)
    if IS_VARLEN:
        i_n = tl.load(chunk_seq + i_slot).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
        i_c = i_slot - tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        i_n, i_c = i_slot // NT, i_slot % NT
        bos = i_n.to(tl.int64) * T
        seq_len = bos * 0 + T
    rows = tl.arange(0, C)
    o_k = tl.arange(0, BK)
    t_in = i_c * C + rows
    valid = t_in < seq_len
    tok = bos + t_in
    m_qk = valid[:, None] & (o_k < K)[None, :]
    b_k = tl.load(k + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_qk, other=0.0).to(tl.float32)
    b_g = tl.load(g + tok * H + i_h, mask=valid, other=0.0).to(tl.float32)
    b_beta = tl.load(beta + tok * H + i_h, mask=valid, other=0.0).to(tl.float32)
    _, decay, _, _, _ = _chunk_decays(b_g, C)
    kk = tl.where(rows[:, None] > rows[None, :], tl.dot(b_k, tl.trans(b_k), input_precision=PRECISION) * decay, 0.0)
    eye = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)
    off = (i_slot.to(tl.int64) * H + i_h) * C * C + rows[:, None] * C + rows[None, :]
    tl.store(t1 + off, _solve_unit_lower(kk * b_beta[None, :], eye, C))
    if RESIDUAL:
        b_gamma = tl.load(gamma + tok * H + i_h, mask=valid, other=0.0).to(tl.float32)
        tl.store(t2 + off, _solve_unit_lower(kk * b_gamma[None, :], eye, C))


@triton.jit
def _chunk_fwd_kernel(
    q, k, v, g, beta, gamma, s0, r0, o, s_out, r_out, cu_seqlens, chunk_offsets, states_s, states_r, t1, t2,
    scale, clip, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DELTA: tl.constexpr, RESIDUAL: tl.constexpr, HAS_S0: tl.constexpr, HAS_R0: tl.constexpr,
    IS_VARLEN: tl.constexpr, STORE_STATES: tl.constexpr, PRECISION: tl.constexpr,
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

    # states [BK, BV] fp32; rows n of [N, H, K, V] (int64: N * H * K * V may pass 2^31)
    state_off = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    m_state = m_k[:, None] & m_v[None, :]
    if HAS_S0:
        S = tl.load(s0 + state_off, mask=m_state, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    if RESIDUAL:
        if HAS_R0:
            R = tl.load(r0 + state_off, mask=m_state, other=0.0).to(tl.float32)
        else:
            R = tl.zeros([BK, BV], dtype=tl.float32)

    n_chunks = (seq_len + C - 1) // C
    for i_c in range(0, n_chunks):
        t_in = i_c * C + rows  # position in the sequence
        valid = t_in < seq_len
        tok = bos + t_in  # token index in the flat [B * T] (or packed) order
        m_qk = valid[:, None] & m_k[None, :]
        m_vv = valid[:, None] & m_v[None, :]
        # padding tokens load k = v = beta = gamma = 0 and g = 0: they leave the states as they are
        b_q = tl.load(q + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_qk, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_qk, other=0.0).to(tl.float32)
        b_v = tl.load(v + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_vv, other=0.0).to(tl.float32)
        b_g = tl.load(g + tok * H + i_h, mask=valid, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + tok * H + i_h, mask=valid, other=0.0).to(tl.float32)
        slot = (chunk_base + i_c) * H + i_h  # this chunk and head in the per-chunk buffers
        if STORE_STATES:  # entering states of every chunk, [chunks, H, K, V], for the backward
            chunk_off = slot * K * V + o_k[:, None] * V + o_v[None, :]
            tl.store(states_s + chunk_off, S, mask=m_state)
            if RESIDUAL:
                tl.store(states_r + chunk_off, R, mask=m_state)

        _, decay, growth, to_end, chunk_decay = _chunk_decays(b_g, C)

        qk = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * decay  # inclusive: reads S_t
        kk = tl.where(strict, tl.dot(b_k, tl.trans(b_k), input_precision=PRECISION) * decay, 0.0)
        q_g = b_q * growth[:, None]
        k_g = b_k * growth[:, None]

        # pass 1: base state S; e = v_t - S~_t^T k_t for every t of the chunk
        pred = b_v - tl.dot(k_g, S, input_precision=PRECISION)
        if DELTA:
            b_t1 = tl.load(t1 + slot * C * C + rows[:, None] * C + rows[None, :])
            e = tl.dot(b_t1, pred, input_precision=PRECISION)
            w1 = e
        else:
            w1 = b_v
            if RESIDUAL:
                e = pred - tl.dot(kk, b_v * b_beta[:, None], input_precision=PRECISION)
        if RESIDUAL:  # noqa: SIM108 (a constexpr branch, kept out of a ternary for the Triton compiler)
            # the base output of residual modes reads S~_t (before the token's write)
            attn1 = tl.where(strict, qk, 0.0)
        else:
            attn1 = qk
        b_o = tl.dot(q_g, S, input_precision=PRECISION) + tl.dot(attn1, w1 * b_beta[:, None], input_precision=PRECISION)
        k_w = b_k * (to_end * b_beta)[:, None]
        S = S * chunk_decay + tl.dot(tl.trans(k_w), w1, input_precision=PRECISION)

        if RESIDUAL:  # pass 2 on the clipped error, straight from registers
            b_gamma = tl.load(gamma + tok * H + i_h, mask=valid, other=0.0).to(tl.float32)
            r = tl.minimum(tl.maximum(e, -clip), clip)
            if DELTA:
                b_t2 = tl.load(t2 + slot * C * C + rows[:, None] * C + rows[None, :])
                w2 = tl.dot(b_t2, r - tl.dot(k_g, R, input_precision=PRECISION), input_precision=PRECISION)
            else:
                w2 = r
            o2 = tl.dot(q_g, R, input_precision=PRECISION) + tl.dot(
                qk, w2 * b_gamma[:, None], input_precision=PRECISION
            )
            b_o += b_gamma[:, None] * o2
            k_w2 = b_k * (to_end * b_gamma)[:, None]
            R = R * chunk_decay + tl.dot(tl.trans(k_w2), w2, input_precision=PRECISION)

        o_ptr = o + (tok[:, None] * H + i_h) * V + o_v[None, :]
        tl.store(o_ptr, b_o.to(o.dtype.element_ty), mask=m_vv)

    tl.store(s_out + state_off, S, mask=m_state)
    if RESIDUAL:
        tl.store(r_out + state_off, R, mask=m_state)


def key_tile(K: int) -> int:
    """The key tile: all of K, padded to a power of two (at least 16, for tl.dot)."""
    BK = max(16, triton.next_power_of_2(K))
    if BK > 256:
        raise ValueError(f"the Triton chunk kernels take head dims K <= 256; got K = {K}")
    return BK


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get fp32 products; half inputs tf32 (their own rounding is coarser)."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def chunk_layout(cu_seqlens: torch.Tensor | None, B: int, T: int, C: int) -> dict:
    """Where each sequence's chunks lie in the per-chunk buffers (inverses, stored states).

    Batched: sequence n's chunks are the slots n * NT + [0, NT), NT = ceil(T / C). Varlen: "offsets"
    [N] (exclusive cumsum of ceil(len / C)) and "seq" [slots] (the sequence of each slot); "slots" is
    then an upper bound known without a host sync (slots past the end are never read).
    """
    NT = triton.cdiv(T, C)
    if cu_seqlens is None:
        return {"NT": NT, "slots": B * NT, "offsets": None, "seq": None}
    N = cu_seqlens.numel() - 1
    counts = (cu_seqlens[1:] - cu_seqlens[:-1] + C - 1).to(torch.int64) // C
    ends = torch.cumsum(counts, 0)
    slots = T // C + N
    seq = torch.searchsorted(ends, torch.arange(slots, device=ends.device), right=True).clamp_(max=max(N - 1, 0))
    return {"NT": NT, "slots": slots, "offsets": (ends - counts).to(torch.int64), "seq": seq}


def chunk_inverses(k, g, beta, gamma, *, residual: bool, cu_seqlens, chunk_size: int, layout: dict):
    """(T1, T2) of every chunk slot and head, [slots, H, C, C] fp32 (T2 None unless ``residual``)."""
    H, K = k.shape[2], k.shape[3]
    C = chunk_size
    t1 = torch.empty(layout["slots"], H, C, C, dtype=torch.float32, device=k.device)
    t2 = torch.empty_like(t1) if residual else None
    if layout["slots"] and H:
        _chunk_inverse_kernel[(layout["slots"], H)](
            k, g, beta, gamma if residual else beta, t1, t2 if residual else t1,
            cu_seqlens if cu_seqlens is not None else k, layout["offsets"] if cu_seqlens is not None else k,
            layout["seq"] if cu_seqlens is not None else k, k.shape[1], layout["NT"],
            H=H, K=K, C=C, BK=key_tile(K), RESIDUAL=residual, IS_VARLEN=cu_seqlens is not None,
            PRECISION=dot_precision(k.dtype),
        )  # fmt: skip
    return t1, t2


def chunk_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor | None,
    S0: torch.Tensor | None,
    R0: torch.Tensor | None,
    *,
    delta: bool,
    residual: bool,
    clip: float,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int,
    store_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
    """Launch the forward. Inputs contiguous; q, k [B, T, H, K], v [B, T, H, V], gates [B, T, H].

    S0, R0: [N, H, K, V] or None (N = B, or len(cu_seqlens) - 1 for varlen). Returns o [B, T, H, V]
    in q's dtype, the final S, R [N, H, K, V] in fp32 (R None unless ``residual``) and what the
    backward reuses: {"layout": chunk_layout(...), "inverses": (T1, T2) (delta modes, else None),
    "states": the entering (S, R) of every chunk slot, each [slots, H, K, V] fp32, if ``store_states``}.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if chunk_size not in (16, 32, 64):
        raise ValueError(f"chunk_size must be 16, 32 or 64; got {chunk_size}")
    BK = key_tile(K)
    # states of [BK, BV] fp32 live in registers: narrower V tiles for wide keys and two states
    BV = max(16, min(triton.next_power_of_2(V), 64 if BK <= 64 else 32))
    o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    S = torch.empty(N, H, K, V, dtype=torch.float32, device=q.device)
    R = torch.empty_like(S) if residual else None
    layout = chunk_layout(cu_seqlens, B, T, chunk_size)
    aux = {"layout": layout, "inverses": None, "states": None}
    if delta:
        aux["inverses"] = chunk_inverses(
            k, g, beta, gamma, residual=residual, cu_seqlens=cu_seqlens, chunk_size=chunk_size, layout=layout
        )
    if store_states:  # slots no sequence reaches (varlen bound) are never read: empty is fine
        states_s = torch.empty(layout["slots"], H, K, V, dtype=torch.float32, device=q.device)
        aux["states"] = (states_s, torch.empty_like(states_s) if residual else None)
    states = aux["states"] or (S, R)
    t1, t2 = aux["inverses"] or (S, None)
    if N * H:
        _chunk_fwd_kernel[(N * H, triton.cdiv(V, BV))](
            q, k, v, g, beta, gamma if residual else beta, S0 if S0 is not None else S, R0 if R0 is not None else S,
            o, S, R if residual else S, cu_seqlens if cu_seqlens is not None else q,
            layout["offsets"] if cu_seqlens is not None else q, states[0], states[1] if residual else S,
            t1, t2 if t2 is not None else t1, scale, clip, T, layout["NT"],
            H=H, K=K, V=V, C=chunk_size, BK=BK, BV=BV, DELTA=delta, RESIDUAL=residual,
            HAS_S0=S0 is not None, HAS_R0=R0 is not None, IS_VARLEN=cu_seqlens is not None,
            STORE_STATES=store_states, PRECISION=dot_precision(q.dtype), **LAUNCH,
        )  # fmt: skip
    return o, S, R, aux
