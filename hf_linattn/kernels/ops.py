"""``residual_attention``: the one functional entry point of the op family (the spec's contract), and the dispatch.

``residual_attention`` validates its arguments (shapes, then the values of the gates in one host
sync), resolves defaults (scale, states) and calls ``dispatch_residual_attention``, which only
picks a backend and calls it: "recurrent" (token-by-token reference), "torch" (chunked, the CPU
default) or "triton" (GPU kernels). Model layers call the dispatch functions directly in the decode
hot path, where the inputs are valid by construction and a check would cost a sync:
``dispatch_residual_attention`` (long sequences), ``dispatch_block_residual_attention`` (a block of n
tokens with its rollback record: verify steps, short prefills) and ``dispatch_decode_step`` (one token).

The Triton kernels are imported once, on the first call with CUDA tensors (or an explicit
backend="triton"), by explicit statements inside try blocks: transformers' remote-code import check
skips try blocks (a checkpoint loads where triton is missing), and still copies the kernel files they
name into its modules cache (a checkpoint uses them where triton is present). Two capabilities, by mode:
the chunked kernels (``SUPPORTED_MODES``, for ``dispatch_residual_attention``) and block decode
(``BLOCK_MODES``, for the block op and the decode step). Block decode has no backward: while autograd
records, or while torch.compile traces, the block op and the decode step stay on torch.
This file imports nothing from hf_linattn but kernel modules (flattened into relative imports in checkpoints).
"""

from __future__ import annotations

import sys
import warnings
from types import ModuleType

import torch

from .block import BlockRecord, block_residual_attention
from .chunked import chunked_residual_attention
from .common import state_dtype
from .decode import decode_step
from .modes import MODES, is_delta, is_residual
from .recurrent import recurrent_residual_attention

BACKENDS = ("auto", "recurrent", "torch", "triton")
BLOCK_BACKENDS = ("auto", "torch", "triton")
# beta * ||k||^2 <= 2 keeps the delta rule's (I - beta k k^T) a contraction; the slack lets
# L2-normalized keys (||k||^2 = 1 up to rounding, even in bf16) with beta <= 1 always pass.
DELTA_BOUND = 2 * (1 + 1e-3)
# The one import attempt per process: {"module": kernels module or None, "reason": why None}.
# A plain dict, not functools.cache, so that torch.compile traces a lookup after the first call.
_triton_cache: dict = {}


def _load_triton() -> ModuleType | None:
    """The Triton kernels module (``triton_ops``), or None when it cannot be used here; tried once, then cached."""
    if "module" not in _triton_cache:
        _triton_cache["module"], _triton_cache["reason"] = _import_triton()
    return _triton_cache["module"]


def _import_triton() -> tuple[ModuleType | None, str]:
    """(kernels module, "") or (None, why not).

    Any exception while importing the ``triton`` package itself (a broken install) means "unavailable", so
    that backend="auto" falls back to torch instead of failing. So does one from the kernel files (say, a
    triton too old for them), with a warning: that is not the plain "no triton here" case.
    """
    try:
        import triton  # noqa: F401
    except Exception as err:  # not only ImportError: a broken triton or driver install can raise anything
        return None, f"the triton package does not import ({type(err).__name__}: {err})"
    try:
        from hf_linattn.kernels.triton.triton_ops import triton_residual_attention
    except Exception as err:
        reason = f"the Triton kernels do not import ({type(err).__name__}: {err})"
        warnings.warn(f"{reason}; the torch paths are used", RuntimeWarning, stacklevel=3)
        return None, reason
    return sys.modules[triton_residual_attention.__module__], ""


def _require_triton(mode: str, capability: str) -> None:
    """Raise NotImplementedError unless the Triton kernels import and list ``mode`` in ``capability``."""
    module = _load_triton()
    if module is None:
        reason = _triton_cache["reason"]
        raise NotImplementedError(f"backend='triton' is unavailable: {reason}; use backend='torch' or 'auto'")
    supported = tuple(getattr(module, capability, ()))
    if mode not in supported:
        why = f"; {module.CHUNK_UNAVAILABLE}" if capability == "SUPPORTED_MODES" and module.CHUNK_UNAVAILABLE else ""
        raise NotImplementedError(
            f"backend='triton' has no kernels for mode {mode!r} (supported: {', '.join(supported) or 'none yet'}"
            f"{why}); use backend='torch' or 'auto'"
        )


def resolve_backend(backend: str, *, mode: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The concrete backend ("recurrent" | "torch" | "triton") of the chunked op for ``backend`` on ``device``.

    "auto" is "triton" only on CUDA devices when the Triton kernels import and their chunked kernel
    covers ``mode`` (``SUPPORTED_MODES``), and the inputs (``dtype``) are not fp64 (the kernels compute
    in fp32, while the contract keeps fp64 states for fp64 inputs); else "torch". An explicit "triton"
    that cannot run ``mode`` raises NotImplementedError. Cheap after the first call (the import is cached).
    """
    if backend == "auto":
        if device.type != "cuda" or dtype == torch.float64:
            return "torch"
        module = _load_triton()
        return "triton" if module is not None and mode in module.SUPPORTED_MODES else "torch"
    if backend == "triton":
        _require_triton(mode, "SUPPORTED_MODES")
    elif backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    return backend


def resolve_block_backend(
    backend: str, *, mode: str, device: torch.device, needs_grad: bool, dtype: torch.dtype = torch.float32
) -> str:
    """The concrete backend ("torch" | "triton") of the block op and the decode step: one test per call.

    "auto" is "triton" on CUDA devices when the block-decode kernel imports and covers ``mode``
    (``BLOCK_MODES``), unless autograd records (``needs_grad``: the kernel has no backward) or
    torch.compile traces (the torch ops compile); else "torch". An explicit "triton" runs the kernel on
    any device (CPU tensors under TRITON_INTERPRET=1) and raises NotImplementedError when it cannot.
    """
    if backend == "auto":
        # fp64 stays on torch: compiled Triton takes clip and scale as fp32 scalars (rel. error ~1e-9)
        if device.type != "cuda" or needs_grad or dtype == torch.float64 or torch.compiler.is_compiling():
            return "torch"
        module = _load_triton()
        return "triton" if module is not None and mode in module.BLOCK_MODES else "torch"
    if backend == "triton":
        _require_triton(mode, "BLOCK_MODES")
    elif backend not in BLOCK_BACKENDS:
        raise ValueError(f"unknown block backend {backend!r}; expected one of {BLOCK_BACKENDS}")
    return backend


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def dispatch_residual_attention(
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
    initial_state: tuple[torch.Tensor | None, torch.Tensor | None] | None,
    output_final_state: bool,
    backend: str,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None] | None]:
    """``residual_attention`` without checks or defaults: resolve the backend and call it.

    For callers whose inputs are valid by construction (model layers): no validation and no
    host sync. q, k: [B, T, H, K]; v: [B, T, H, V]; g, beta: [B, T, H]; gamma: [B, T, H], None
    for gla/gdn; scale: a float; initial_state: (S0, R0), each [B, H, K, V] or None; or None.
    Returns o [B, T, H, V] and (S, R) or None, as ``residual_attention``.
    """
    backend = resolve_backend(backend, mode=mode, device=q.device, dtype=q.dtype)
    if initial_state is None:  # tolerated: layers pass their cache's state, None on the first call
        initial_state = (None, None)
    if backend == "triton":
        fn = _load_triton().triton_residual_attention
    elif backend == "recurrent":
        fn = recurrent_residual_attention
    else:
        fn = chunked_residual_attention
    return fn(q, k, v, g, beta, gamma, mode, clip, scale, initial_state, output_final_state)


def dispatch_block_residual_attention(
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
    initial_state: tuple[torch.Tensor | None, torch.Tensor | None] | None,
    record: bool,
    backend: str = "auto",
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None], BlockRecord | None]:
    """A block of n tokens from a cached state (``block.py``'s op, or the Triton block-decode kernel on CUDA).

    No checks, no host sync. q, k: [B, n, H, K]; v: [B, n, H, V]; g, beta, gamma: [B, n, H] (gamma None for
    gla/gdn); initial_state: (S0, R0), each [B, H, K, V] or None, or None. Returns o [B, n, H, V] in q's
    dtype, the final (S, R) and, if ``record``, the block's ``BlockRecord`` (else None).
    """
    S0, R0 = initial_state if initial_state is not None else (None, None)
    needs_grad = _needs_grad(q, k, v, g, beta, gamma, S0, R0)
    if resolve_block_backend(backend, mode=mode, device=q.device, needs_grad=needs_grad, dtype=q.dtype) == "triton":
        return _load_triton().block_residual_attention_triton(
            q, k, v, g, beta, gamma, mode, clip, scale, initial_state, True, record=record
        )
    o, final, block = block_residual_attention(q, k, v, g, beta, gamma, mode, clip, scale, initial_state, True)
    return o, final, block if record else None


def dispatch_decode_step(
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
    backend: str = "auto",
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]]:
    """One token (``decode.py``'s ``decode_step``, or the fused Triton step on CUDA); same contract as it.

    q, k: [B, H, K]; v: [B, H, V]; g, beta, gamma: [B, H]; state (S, R), each [B, H, K, V] or None.
    Returns o [B, H, V] in q's dtype and the new (S, R).
    """
    needs_grad = _needs_grad(q, k, v, g, beta, gamma, *state)
    if resolve_block_backend(backend, mode=mode, device=q.device, needs_grad=needs_grad, dtype=q.dtype) == "triton":
        return _load_triton().decode_step_triton(q, k, v, g, beta, gamma, mode=mode, clip=clip, scale=scale,
                                                 state=state)  # fmt: skip
    return decode_step(q, k, v, g, beta, gamma, mode=mode, clip=clip, scale=scale, state=state)


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


def _check_values(k, g, beta, gamma, mode) -> None:
    """Gate ranges (g <= 0, beta and gamma in [0, 1], no NaN) and delta-rule stability, one host sync.

    max/min propagate NaN, and NaN fails every comparison below, so NaN gates are caught too.
    NaN/inf in q, k, v are not looked for (the caller's business; a full scan costs).
    """
    if g.numel() == 0:
        return
    dt = state_dtype(k.dtype)
    gates = {"beta": beta} | ({"gamma": gamma} if is_residual(mode) else {})
    stats = [g.amax()]
    for x in gates.values():
        stats += x.aminmax()
    if is_delta(mode):
        k2 = k.to(dt).square().sum(-1)  # ||k_t||^2, [B, T, H]
        stats += [(x.to(dt) * k2).amax() for x in gates.values()]
    g_max, *values = torch.stack([s.to(dt) for s in stats]).tolist()  # the one host sync
    ranges, writes = values[: 2 * len(gates)], values[2 * len(gates) :]
    if not g_max <= 0:
        raise ValueError(f"g must be <= 0 (alpha = exp(g) <= 1; -inf is allowed) and not NaN; got max g = {g_max:.6g}")
    for (name, _), lo, hi in zip(gates.items(), ranges[0::2], ranges[1::2]):
        if not (lo >= 0 and hi <= 1):
            raise ValueError(f"{name} must be in [0, 1] and not NaN; got min {lo:.6g}, max {hi:.6g}")
    for name, worst in zip(gates, writes):
        if worst > DELTA_BOUND:
            raise ValueError(
                f"mode {mode!r}: the delta rule needs {name} * ||k||^2 <= 2 (else its state diverges); got max "
                f"{name} * ||k||^2 = {worst:.6g}. Keys should be L2-normalized per head (as the model layers do)"
            )


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
        g: [B, T, H] log-decay (<= 0; -inf resets the state). beta: [B, T, H] base write strength in [0, 1].
        gamma: [B, T, H] residual write strength in [0, 1]; None for gla/gdn.
        mode: "gla" | "gdn" | "rla" | "rdn".
        clip: bound c of the clipped residual r = clamp(e, -c, c) (residual modes).
        scale: multiplies q; defaults to K ** -0.5.
        initial_state: (S0, R0), each [B, H, K, V] or None; R0 is None for gla/gdn.
        output_final_state: also return the final (S, R).
        backend: "auto" (triton on CUDA tensors when kernels exist for the mode, torch otherwise),
            "recurrent", "torch", "triton".

    Returns:
        o: [B, T, H, V] in q's dtype, and (S, R) in fp32 (fp64 for fp64 inputs; R is None
        for gla/gdn) if ``output_final_state``, else None.

    Raises ValueError for bad arguments, gates out of range, and, for gdn/rdn, beta * ||k||^2 > 2
    (or gamma * ||k||^2 > 2), where the delta rule diverges. The value checks cost one host sync
    and are skipped while torch.compile traces.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if not clip > 0:
        raise ValueError(f"clip must be > 0; got {clip}")
    _check_shapes(q, k, v, g, beta, gamma, mode, initial_state)
    if not torch.compiler.is_compiling():
        _check_values(k, g, beta, gamma, mode)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if not is_residual(mode):
        gamma = None
    state = tuple(initial_state) if initial_state is not None else (None, None)
    return dispatch_residual_attention(
        q, k, v, g, beta, gamma, mode=mode, clip=clip, scale=scale, initial_state=state,
        output_final_state=output_final_state, backend=backend,
    )  # fmt: skip
