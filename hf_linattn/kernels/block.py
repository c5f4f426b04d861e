"""Block op of residual linear attention: n new tokens from a cached state in one parallel pass.

Used by decoding verification (speculative / lookahead decoding) and exact cache rollback: it
returns the outputs, the final state and a ``BlockRecord`` from which the state after any
accepted prefix j (0 <= j <= n, per batch row) is rebuilt exactly, to rounding.

Per head, with b_t the cumulative log-decay of the block (b_0 = 0), Gamma_t = exp(b_t) and
D_ts = exp(b_t - b_s) for s <= t, the state after t tokens is

    S_t = Gamma_t S0 + sum_{s <= t} D_ts k_s x_s^T            (x_s: what token s writes)

with x = beta * v (gla) or x = beta * e (delta rule). The errors e_t = v_t - S~_t^T k_t of the
delta rule solve the unit-lower system (I + A diag(beta)) e = V - (Gamma K) S0 with
A = strictly-lower(K K^T * D) (the WY/UT transform of chunked.py, solved for e itself, so a
small beta never divides). For gla, e = V - (Gamma K) S0 - A (beta V). The residual state R
has the same form with writes y = gamma * r (rla, r = clamp(e, -c, c)) or, for rdn, the delta
rule on r: (I + A diag(gamma)) eps = r - (Gamma K) R0, y = gamma * eps. So the record keeps
S0, R0, the keys, the log-decays and the writes x, y: O(n (K + V)) per head instead of one
K x V state per token; a state is built only when asked (one [K, n] x [n, V] product).

A reset g_t = -inf (alpha_t = 0) is exact: b sums the finite g only and a count of resets
marks the segments; decays across a reset are exactly 0 (never exp(-inf - -inf) = nan).
Log-decays are summed in fp64 so that exp(b_t - b_s) stays accurate when |b| is large.
n <= ``BLOCK_CHUNK`` is one chunk; longer blocks loop over chunks (only the states pass on).
n = 1 skips the decay matrices (D = [1], A = 0): it is then a plain decode step.
No autograd needed (decoding runs under no_grad), but gradients flow and match the reference.
This file imports nothing from hf_linattn by name (it is also checkpoint remote code).
"""

from __future__ import annotations

import functools

import torch

from .common import state_dtype
from .modes import is_delta, is_residual

BLOCK_CHUNK = 64  # one chunk covers every usual draft length; longer blocks loop over chunks
_NEG_INF = float("-inf")


@functools.lru_cache(maxsize=64)
def _causal(c: int, device: torch.device) -> torch.Tensor:
    """[c, c] bool, True on and below the diagonal (cached: the block op runs every decode step)."""
    return torch.ones(c, c, dtype=torch.bool, device=device).tril_()


def _log_decays(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """g [..., n] fp64 -> (b, resets), each [..., n + 1] with a leading 0 for the entering state.

    b_t: sum of the finite g_u, u <= t; resets_t: how many g_u = -inf, u <= t (None when there
    is none, the common case, which skips the segment masks; on CUDA always kept: no sync).
    """
    g = torch.nn.functional.pad(g, (1, 0))
    reset = g == _NEG_INF
    if not g.is_cuda and not reset.any():
        return g.cumsum(-1), None
    return g.masked_fill(reset, 0.0).cumsum(-1), reset.cumsum(-1)


def _decays(g: torch.Tensor, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """g [BH, c] fp64 -> D [BH, c, c] (D_ts = exp(b_t - b_s) for s <= t, else 0), Gamma [BH, c, 1], in dt.

    Built as one [c + 1, c + 1] matrix over the positions 0..c (0: the entering state), whose
    column 0 is Gamma; same-segment masking zeroes every decay across a reset, Gamma included.
    """
    b, resets = _log_decays(g)
    keep = _causal(b.shape[-1], b.device)
    if resets is not None:
        keep = keep & (resets[:, :, None] == resets[:, None, :])
    # differences in fp64 (b may be large), exp in dt: a rounded exponent d costs a relative |d| eps, only where
    # exp(-|d|) is small (absolute error below eps)
    ext = (b[:, :, None] - b[:, None, :]).masked_fill_(~keep, _NEG_INF).to(dt).exp_()
    return ext[:, 1:, 1:], ext[:, 1:, :1]


def _delta_solve(a: torch.Tensor | None, strength: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve (I + A diag(strength)) e = rhs; A [BH, c, c] strictly lower (None: A = 0), rhs [BH, c, V]."""
    if a is None:
        return rhs
    # unitriangular: the (zero) diagonal of A is not read, I is implied
    return torch.linalg.solve_triangular(a * strength[:, None, :], rhs, upper=False, unitriangular=True)


def _advance(state: torch.Tensor | None, growth: torch.Tensor, k_w: torch.Tensor, writes: torch.Tensor):
    """growth [BH, 1, 1] * state [BH, K, V] + k_w [BH, K, n] @ writes [BH, n, V] (state None: zeros)."""
    if state is None:
        return k_w @ writes
    return (state * growth).baddbmm_(k_w, writes)  # in place: no copy of a K x V temporary


def _chunk(q, k, v, g, beta, gamma, S0, R0, delta: bool, clip: float, final: bool):
    """One chunk of c tokens, heads flattened into BH.

    q (already scaled), k [BH, c, K]; v [BH, c, V]; g [BH, c] fp64; beta, gamma [BH, c] (gamma
    None: no R); S0, R0 [BH, K, V] or None (zeros). Returns o [BH, c, V], the writes x, y
    [BH, c, V] (y None without R) and, if ``final``, the states S, R [BH, K, V] after the chunk.
    """
    dt, residual = q.dtype, gamma is not None
    if q.shape[1] == 1:  # D = [1], A = 0, Gamma = alpha
        decay, a, growth = None, None, g.exp().to(dt)[..., None]
    else:
        decay, growth = _decays(g, dt)
        a = (k @ k.transpose(-1, -2)).mul_(decay).tril_(-1) if delta or residual else None  # keys read S~_t
    qk_d = q @ k.transpose(-1, -2)  # decayed Q K^T, inclusive (reads S_t)
    if decay is not None:
        qk_d.mul_(decay)
    k_s0 = None if S0 is None else k @ S0

    # base state: what every token writes
    if delta:
        e = _delta_solve(a, beta, v if k_s0 is None else torch.addcmul(v, growth, k_s0, value=-1))
        x = beta[..., None] * e
    else:
        x = beta[..., None] * v
        if residual:
            e = v if k_s0 is None else torch.addcmul(v, growth, k_s0, value=-1)
            e = e if a is None else torch.baddbmm(e, a, x, alpha=-1)
    # residual modes read S~_t (before the token writes): strictly causal
    o = None
    if not residual:
        o = qk_d @ x
    elif decay is not None:
        o = qk_d.tril(-1) @ x
    if S0 is not None:
        qs = q @ S0
        o = qs.mul_(growth) if o is None else o.addcmul_(growth, qs)
    elif o is None:  # n = 1 from zeros: nothing to read
        o = torch.zeros_like(x)

    y = None
    if residual:
        r = e.clamp(-clip, clip)  # not in place: e may be v itself (n = 1, S0 = None)
        if delta:  # R is a second delta rule whose values are r
            y = gamma[..., None] * _delta_solve(a, gamma, r if R0 is None else r.addcmul_(growth, k @ R0, value=-1))
        else:
            y = r.mul_(gamma[..., None])
        o_res = qk_d @ y
        if R0 is not None:
            o_res.addcmul_(growth, q @ R0)
        o.addcmul_(gamma[..., None], o_res)
    if not final:
        return o, x, y, None, None
    # state after the chunk: Gamma_c S0 + (K * D_c,:)^T X
    k_end = (k if decay is None else k * decay[:, -1, :, None]).transpose(-1, -2)
    g_end = growth[:, -1:]
    S = _advance(S0, g_end, k_end, x)
    R = _advance(R0, g_end, k_end, y) if residual else None
    return o, x, y, S, R


class BlockRecord:
    """What a block wrote, to rebuild the state after any prefix of it (cache rollback).

    Fields (dt = the state dtype; B batch, H heads, n tokens of the block):
        S0, R0: [B, H, K, V] dt, the entering states, or None for zeros (R0 None for gla/gdn).
            Held by reference, not copied: ``state_after`` raises if they were changed in place
            (not detectable for tensors made under torch.inference_mode).
        k: [B, H, n, K] dt, the keys.
        x: [B, H, n, V] dt, what each token writes into S (beta v, or beta e for the delta rule).
        y: [B, H, n, V] dt, what each token writes into R (None for gla/gdn).
        g: [B, H, n] fp64, the log-decays (-inf: a reset).
    All but S0, R0 are the record's own tensors (never views of the op's inputs).
    """

    def __init__(self, S0, R0, k, x, y, g):
        self.S0, self.R0, self.k, self.x, self.y, self.g = S0, R0, k, x, y, g
        self._versions = self._state_versions()

    def _fields(self) -> tuple[torch.Tensor | None, ...]:
        return self.S0, self.R0, self.k, self.x, self.y, self.g

    def _state_versions(self) -> tuple[int | None, ...]:
        # inference tensors keep no version counter: no guard for them
        return tuple(None if s is None or s.is_inference() else s._version for s in (self.S0, self.R0))

    def _check_states(self) -> None:
        if self._state_versions() != self._versions:
            raise RuntimeError("the initial state of this BlockRecord was modified in place; it cannot rebuild states")

    def __len__(self) -> int:
        """n, the number of tokens of the block."""
        return self.k.shape[2]

    def state_after(self, lengths: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(S, R) after the first ``lengths`` tokens of the block, each [B, H, K, V] (R None for gla/gdn).

        lengths: an int in 0..n, or a LongTensor [B] with one prefix length per batch row.
        """
        self._check_states()
        B, H, n, K = self.k.shape
        device = self.k.device
        if isinstance(lengths, torch.Tensor):
            j = lengths.to(device=device, dtype=torch.long).expand(B)
            if bool(((j < 0) | (j > n)).any()):
                raise ValueError(f"lengths must lie in 0..{n}; got {lengths.tolist()}")
        else:
            if not 0 <= lengths <= n:
                raise ValueError(f"lengths must lie in 0..{n}; got {lengths}")
            j = torch.full((B,), int(lengths), dtype=torch.long, device=device)
        b, resets = _log_decays(self.g)  # [B, H, n + 1]
        index = j[:, None, None].expand(B, H, 1)
        b_j = b.gather(-1, index)
        keep = torch.arange(n + 1, device=device) <= j[:, None, None]  # positions 0..j (0: the entering state)
        if resets is not None:  # nothing before a reset survives it
            keep = keep & (resets == resets.gather(-1, index))
        weight = (b_j - b).masked_fill_(~keep, _NEG_INF).exp_().to(self.k.dtype)  # [B, H, n + 1]: D_js
        growth = weight[..., :1].reshape(B * H, 1, 1)  # Gamma_j
        k_w = (self.k * weight[..., 1:, None]).flatten(0, 1).transpose(-1, -2)  # [BH, K, n]

        def build(state, writes):
            state = None if state is None else state.flatten(0, 1)
            return _advance(state, growth, k_w, writes.flatten(0, 1)).view(B, H, K, -1)

        return build(self.S0, self.x), (build(self.R0, self.y) if self.y is not None else None)

    def select(self, batch_indices) -> BlockRecord:
        """The record of some batch rows only (e.g. the beam or lookahead branch that is kept).

        batch_indices: an int, a list of ints, a LongTensor or a slice (indexes dim 0; the batch dim is kept).
        """
        self._check_states()
        if isinstance(batch_indices, int):
            batch_indices = [batch_indices]
        return BlockRecord(*(None if t is None else t[batch_indices] for t in self._fields()))

    def nbytes(self) -> int:
        """Bytes of the tensors the record holds, the (referenced) initial states included."""
        return sum(t.numel() * t.element_size() for t in self._fields() if t is not None)

    def extend(self, *others: BlockRecord) -> BlockRecord:
        """This record followed by ``others``, blocks that each started from the final state of the one before.

        The states are linear in the writes, so the records concatenate exactly: one entering state for all
        (the others' own entering states are not read).
        """
        records = (self, *others)

        def cat(name: str) -> torch.Tensor | None:
            parts = [getattr(r, name) for r in records]
            return None if parts[0] is None else torch.cat(parts, dim=2 if parts[0].dim() == 4 else -1)

        return BlockRecord(self.S0, self.R0, cat("k"), cat("x"), cat("y"), cat("g"))

    def without_state(self) -> BlockRecord:
        """The same writes with no entering state held: a block that only ever follows another (see ``extend``)."""
        return BlockRecord(None, None, self.k, self.x, self.y, self.g)

    def truncate(self, n: int) -> BlockRecord:
        """The record of the first n tokens only (views; n <= len)."""
        return BlockRecord(self.S0, self.R0, self.k[:, :, :n], self.x[:, :, :n],
                           None if self.y is None else self.y[:, :, :n], self.g[..., :n])  # fmt: skip

    def drop_front(self, m: int) -> BlockRecord:
        """The record of the tokens after the first m, starting from the state after them (one state is built)."""
        if m == 0:
            return self
        S, R = self.state_after(m)
        return BlockRecord(S, R, self.k[:, :, m:], self.x[:, :, m:], None if self.y is None else self.y[:, :, m:],
                           self.g[..., m:])  # fmt: skip


def block_residual_attention(
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
    chunk_size: int = BLOCK_CHUNK,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None] | None, BlockRecord]:
    """A block of n tokens in one parallel pass (a loop over chunks only when n > ``chunk_size``).

    q, k: [B, n, H, K]; v: [B, n, H, V]; g, beta, gamma: [B, n, H] (gamma None for gla/gdn; g may
    be -inf, an exact reset); initial_state: (S0, R0), each [B, H, K, V] or None, or None.
    Arguments are not validated (as for the other backends, ``residual_attention`` does that).
    Returns o [B, n, H, V] in q's dtype, (S, R) in fp32 (fp64 for fp64 inputs; R None for gla/gdn)
    if ``output_final_state`` else None, and the ``BlockRecord`` of the block.
    """
    B, n, H, K = q.shape
    V = v.shape[-1]
    dt = state_dtype(q.dtype)
    delta, residual = is_delta(mode), is_residual(mode)
    S0, R0 = initial_state if initial_state is not None else (None, None)
    S0 = S0.to(dt) if S0 is not None else None
    R0 = R0.to(dt) if residual and R0 is not None else None

    def heads(x, dtype=dt, own=False):  # [B, n, H, *D] -> [B * H, n, *D], one copy at most (none if a view does)
        x = x.transpose(1, 2)
        if own or x.dtype != dtype:  # own: the record keeps it, so never a view of the caller's tensor
            x = torch.empty(x.shape, dtype=dtype, device=x.device).copy_(x)
        return x.reshape(B * H, n, *x.shape[3:])

    q_h, k_h, v_h, beta_h = heads(q) * scale, heads(k, own=True), heads(v), heads(beta)
    gamma_h = heads(gamma) if residual else None
    g_h = heads(g, torch.float64, own=True)

    S, R = (None if s is None else s.flatten(0, 1) for s in (S0, R0))
    outs, xs, ys = [], [], []
    for c0 in range(0, n, chunk_size):
        c = slice(c0, min(n, c0 + chunk_size))
        final = output_final_state or c.stop < n
        o_c, x_c, y_c, S, R = _chunk(
            q_h[:, c], k_h[:, c], v_h[:, c], g_h[:, c], beta_h[:, c], gamma_h[:, c] if residual else None,
            S, R, delta, clip, final,
        )  # fmt: skip
        outs.append(o_c)
        xs.append(x_c)
        ys.append(y_c)
    cat = (lambda ts: ts[0]) if len(outs) == 1 else (lambda ts: torch.cat(ts, 1))
    o = cat(outs).view(B, H, n, V).transpose(1, 2)
    if not o.is_contiguous() or o.dtype != q.dtype:  # n = 1 needs no copy
        o = torch.empty(o.shape, dtype=q.dtype, device=o.device).copy_(o)
    record = BlockRecord(
        S0,
        R0,
        k_h.view(B, H, n, K),
        cat(xs).view(B, H, n, V),
        cat(ys).view(B, H, n, V) if residual else None,
        g_h.view(B, H, n),
    )
    final_state = None
    if output_final_state:
        final_state = (S.view(B, H, K, V), R.view(B, H, K, V) if residual else None)
    return o, final_state, record
