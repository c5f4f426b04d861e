"""Backend resolution ("auto" -> triton only where kernels exist) and the check-free dispatch, on CPU.

Two capabilities: the chunked kernels (``resolve_backend``, SUPPORTED_MODES) and block decode
(``resolve_block_backend``, BLOCK_MODES). CUDA is simulated: torch.device("cuda") objects need no GPU,
and the Triton import is either monkeypatched (``ops._import_triton`` gives fake kernel modules) or fed
fake ``triton`` packages on sys.path.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

import hf_linattn.kernels.ops as ops
from hf_linattn.kernels import (
    MODES,
    dispatch_block_residual_attention,
    dispatch_decode_step,
    dispatch_residual_attention,
    residual_attention,
    resolve_backend,
    resolve_block_backend,
)

from .test_residual_attention import make_inputs, rel_err

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_triton_cache(monkeypatch):
    """Every test starts with no cached import attempt and leaves the real cache as it was."""
    monkeypatch.setattr(ops, "_triton_cache", {})


def fake_kernels(*modes: str, block_modes: tuple[str, ...] = (), calls: list | None = None) -> SimpleNamespace:
    def triton_residual_attention(*args):
        calls.append(args[6])  # the mode
        return "o", None

    def block_residual_attention_triton(*args, record):
        calls.append(("block", args[6], record))
        return "o", None, None

    def decode_step_triton(*args, mode, **kwargs):
        calls.append(("step", mode))
        return "o", None

    return SimpleNamespace(
        SUPPORTED_MODES=modes, BLOCK_MODES=block_modes, CHUNK_UNAVAILABLE="" if modes else "simulated: not built",
        triton_residual_attention=triton_residual_attention,
        block_residual_attention_triton=block_residual_attention_triton, decode_step_triton=decode_step_triton,
    )  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_triton_missing_gives_torch(monkeypatch, mode):
    monkeypatch.setattr(ops, "_import_triton", lambda: (None, "simulated: no triton"))
    assert resolve_backend("auto", mode=mode, device=CUDA) == "torch"
    assert resolve_backend("auto", mode=mode, device=CPU) == "torch"
    with pytest.raises(NotImplementedError, match="backend='triton' is unavailable: simulated: no triton"):
        resolve_backend("triton", mode=mode, device=CUDA)


def test_kernels_only_for_supported_modes_and_cuda(monkeypatch):
    monkeypatch.setattr(ops, "_import_triton", lambda: (fake_kernels("gdn", "rdn"), ""))
    assert resolve_backend("auto", mode="gdn", device=CUDA) == "triton"
    assert resolve_block_backend("auto", mode="gdn", device=CUDA, needs_grad=False) == "torch"  # no block kernels
    assert resolve_backend("auto", mode="rdn", device=CUDA) == "triton"
    assert resolve_backend("auto", mode="gla", device=CUDA) == "torch"  # mode unsupported
    assert resolve_backend("auto", mode="gdn", device=CPU) == "torch"  # not CUDA
    assert resolve_backend("auto", mode="gdn", device=CUDA, dtype=torch.float64) == "torch"  # fp64 states
    assert resolve_backend("auto", mode="gdn", device=CUDA, dtype=torch.bfloat16) == "triton"
    assert resolve_backend("triton", mode="rdn", device=CUDA) == "triton"
    with pytest.raises(NotImplementedError, match=r"no kernels for mode 'rla' \(supported: gdn, rdn\)"):
        resolve_backend("triton", mode="rla", device=CUDA)


def test_explicit_backends_pass_through(monkeypatch):
    monkeypatch.setattr(ops, "_import_triton", lambda: pytest.fail("recurrent/torch must not try Triton"))
    for backend in ("recurrent", "torch"):
        assert resolve_backend(backend, mode="rdn", device=CUDA) == backend
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("cuda", mode="rdn", device=CPU)


def test_dispatch_calls_the_resolved_backend(monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "_import_triton", lambda: (fake_kernels("gdn", calls=calls), ""))
    q, k, v, g, beta, *_ = make_inputs("gdn", T=5, dtype=torch.float32, seed=20)
    kw = {"mode": "gdn", "clip": 1.0, "scale": 0.25, "initial_state": (None, None), "output_final_state": False}
    assert dispatch_residual_attention(q, k, v, g, beta, None, backend="triton", **kw) == ("o", None)
    assert calls == ["gdn"]
    o, _ = dispatch_residual_attention(q, k, v, g, beta, None, backend="auto", **kw)  # CPU tensors: torch
    assert calls == ["gdn"] and o.shape == v.shape
    o_none, _ = dispatch_residual_attention(q, k, v, g, beta, None, backend="auto", **(kw | {"initial_state": None}))
    assert torch.equal(o_none, o)


def write_fake_triton(root, body: str) -> None:
    (root / "triton").mkdir()
    (root / "triton" / "__init__.py").write_text(body)


def _triton_modules() -> dict:
    return {name: module for name, module in sys.modules.items() if name == "triton" or name.startswith("triton.")}


@pytest.fixture
def fake_triton_path(monkeypatch, tmp_path):
    """A folder first on sys.path where a test writes its own ``triton`` package; afterwards sys.modules holds
    the real ``triton`` modules again (or none), so that torch.compile in later tests never sees the fake."""
    saved = _triton_modules()
    for name in saved:
        del sys.modules[name]
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in _triton_modules():
        del sys.modules[name]
    sys.modules.update(saved)


def test_broken_triton_install_does_not_break_auto(fake_triton_path):
    write_fake_triton(fake_triton_path, "raise RuntimeError('CUDA driver too old')\n")
    assert ops._load_triton() is None
    assert resolve_backend("auto", mode="rdn", device=CUDA) == "torch"
    with pytest.raises(NotImplementedError, match="RuntimeError: CUDA driver too old"):
        resolve_backend("triton", mode="rdn", device=CUDA)


def test_triton_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    assert ops._load_triton() is None
    assert resolve_backend("auto", mode="gdn", device=CUDA) == "torch"
    with pytest.raises(NotImplementedError, match="triton package does not import"):
        resolve_backend("triton", mode="gdn", device=CUDA)


def test_kernel_files_that_fail_to_import_warn_and_give_torch(fake_triton_path, monkeypatch):
    """triton imports but the kernel files do not (say, a triton too old for them): torch, with a warning."""
    write_fake_triton(fake_triton_path, "")
    monkeypatch.setitem(sys.modules, "hf_linattn.kernels.triton.triton_ops", None)
    with pytest.warns(RuntimeWarning, match="the Triton kernels do not import"):
        assert ops._load_triton() is None
    assert resolve_backend("auto", mode="rdn", device=CUDA) == "torch"
    assert resolve_block_backend("auto", mode="rdn", device=CUDA, needs_grad=False) == "torch"
    with pytest.raises(NotImplementedError, match="the Triton kernels do not import"):
        resolve_block_backend("triton", mode="rdn", device=CUDA, needs_grad=False)


def test_real_kernels_module():
    """With triton importing, the real kernels load: block decode for every mode; the chunked kernel once it ships."""
    pytest.importorskip("triton")
    module = ops._load_triton()
    assert module is not None and module.__name__ == "hf_linattn.kernels.triton.triton_ops"
    assert module.BLOCK_MODES == MODES
    for mode in MODES:
        assert resolve_block_backend("auto", mode=mode, device=CUDA, needs_grad=False) == "triton"
    if module.chunk_residual_attention_triton is None:  # triton_chunk.py is not in this build
        assert module.SUPPORTED_MODES == () and module.CHUNK_UNAVAILABLE
        assert resolve_backend("auto", mode="rdn", device=CUDA) == "torch"
        with pytest.raises(NotImplementedError, match=r"supported: none yet; the chunked Triton kernel does not"):
            resolve_backend("triton", mode="rdn", device=CUDA)
    else:
        assert module.SUPPORTED_MODES == MODES and not module.CHUNK_UNAVAILABLE
        assert resolve_backend("auto", mode="rdn", device=CUDA) == "triton"


def test_import_is_attempted_once(fake_triton_path, monkeypatch):
    write_fake_triton(fake_triton_path, "raise RuntimeError('broken')\n")
    attempts = []
    real_import = ops._import_triton
    monkeypatch.setattr(ops, "_import_triton", lambda: attempts.append(1) or real_import())
    for _ in range(3):
        assert resolve_backend("auto", mode="gdn", device=CUDA) == "torch"
        assert resolve_block_backend("auto", mode="gdn", device=CUDA, needs_grad=False) == "torch"
    assert attempts == [1]


def test_block_backend_auto(monkeypatch):
    """Block decode takes Triton only on CUDA, for modes with a kernel, without autograd and outside torch.compile."""
    monkeypatch.setattr(ops, "_import_triton", lambda: (fake_kernels(block_modes=("gdn", "rdn")), ""))
    assert resolve_block_backend("auto", mode="rdn", device=CUDA, needs_grad=False) == "triton"
    assert resolve_block_backend("auto", mode="rdn", device=CUDA, needs_grad=False, dtype=torch.float64) == "torch"
    assert resolve_block_backend("auto", mode="gla", device=CUDA, needs_grad=False) == "torch"  # mode unsupported
    assert resolve_block_backend("auto", mode="rdn", device=CPU, needs_grad=False) == "torch"  # not CUDA
    assert resolve_block_backend("auto", mode="rdn", device=CUDA, needs_grad=True) == "torch"  # no backward
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert resolve_block_backend("auto", mode="rdn", device=CUDA, needs_grad=False) == "torch"
    monkeypatch.undo()
    # the chunked capability is separate: none here
    monkeypatch.setattr(ops, "_import_triton", lambda: (fake_kernels(block_modes=("gdn", "rdn")), ""))
    monkeypatch.setattr(ops, "_triton_cache", {})
    assert resolve_backend("auto", mode="rdn", device=CUDA) == "torch"
    with pytest.raises(NotImplementedError, match=r"no kernels for mode 'rdn' \(supported: none yet; simulated"):
        resolve_backend("triton", mode="rdn", device=CUDA)


def test_block_backend_explicit(monkeypatch):
    monkeypatch.setattr(ops, "_import_triton", lambda: (fake_kernels(block_modes=("gdn",)), ""))
    assert resolve_block_backend("triton", mode="gdn", device=CPU, needs_grad=True) == "triton"  # as asked
    assert resolve_block_backend("torch", mode="gdn", device=CUDA, needs_grad=False) == "torch"
    with pytest.raises(NotImplementedError, match=r"no kernels for mode 'rla' \(supported: gdn\)"):
        resolve_block_backend("triton", mode="rla", device=CUDA, needs_grad=False)
    with pytest.raises(ValueError, match="unknown block backend 'recurrent'"):
        resolve_block_backend("recurrent", mode="gdn", device=CPU, needs_grad=False)


def test_block_dispatch_calls_the_resolved_backend(monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "_import_triton", lambda: (fake_kernels(block_modes=MODES, calls=calls), ""))
    q, k, v, g, beta, gamma, S0, R0 = make_inputs("rdn", T=3, dtype=torch.float32, seed=23)
    kw = {"mode": "rdn", "clip": 1.0, "scale": 0.25}
    out = dispatch_block_residual_attention(q, k, v, g, beta, gamma, initial_state=(S0, R0), record=False,
                                            backend="triton", **kw)  # fmt: skip
    assert out == ("o", None, None) and calls == [("block", "rdn", False)]
    step = dispatch_decode_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], gamma[:, 0], state=(S0, R0),
                                backend="triton", **kw)  # fmt: skip
    assert step == ("o", None) and calls[-1] == ("step", "rdn")
    # auto on CPU tensors: the torch block op and decode step, with and without the record
    o, final, record = dispatch_block_residual_attention(q, k, v, g, beta, gamma, initial_state=(S0, R0),
                                                       record=True, **kw)  # fmt: skip
    assert len(calls) == 2 and o.shape == v.shape and len(record) == 3 and final[1].shape == R0.shape
    assert dispatch_block_residual_attention(q, k, v, g, beta, gamma, initial_state=None, record=False, **kw)[2] is None
    o1, (S1, _) = dispatch_decode_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], gamma[:, 0],
                                       state=(S0, R0), **kw)  # fmt: skip
    assert len(calls) == 2 and torch.allclose(o1, o[:, 0], atol=1e-5)
    assert torch.allclose(S1, record.state_after(1)[0], atol=1e-5)


def test_auto_on_cpu_runs_torch_path_in_real_environment(monkeypatch):
    """No Triton import on CPU tensors, and the chunked path computes the result."""
    calls = []
    real = ops.chunked_residual_attention
    monkeypatch.setattr(ops, "chunked_residual_attention", lambda *a: calls.append(a[6]) or real(*a))
    monkeypatch.setattr(ops, "_import_triton", lambda: pytest.fail("CPU tensors must not try Triton"))
    inputs = make_inputs("rdn", T=20, dtype=torch.float64, seed=21)
    q, k, v, g, beta, gamma, S0, R0 = inputs
    o, _ = residual_attention(q, k, v, g, beta, gamma, mode="rdn", initial_state=(S0, R0), backend="auto")
    o_ref, _ = residual_attention(q, k, v, g, beta, gamma, mode="rdn", initial_state=(S0, R0), backend="recurrent")
    assert calls == ["rdn"] and rel_err(o, o_ref) < 1e-10


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["torch", "recurrent"])
def test_dispatch_equals_public_op_without_host_sync(mode, backend, monkeypatch):
    """The hot-path entry computes the same result and never reads a tensor value on the host."""
    q, k, v, g, beta, gamma, S0, R0 = make_inputs(mode, T=70, dtype=torch.float32, seed=22)
    o_ref, (S_ref, _) = residual_attention(
        q, k, v, g, beta, gamma, mode=mode, initial_state=(S0, R0), output_final_state=True, backend=backend
    )

    def no_sync(*args):
        raise AssertionError("host sync in dispatch_residual_attention")

    for method in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, method, no_sync)
    o, (S, _) = dispatch_residual_attention(
        q, k, v, g, beta, gamma, mode=mode, clip=1.0, scale=q.shape[-1] ** -0.5, initial_state=(S0, R0),
        output_final_state=True, backend=backend,
    )  # fmt: skip
    monkeypatch.undo()
    assert torch.equal(o, o_ref) and torch.equal(S, S_ref)


def test_importing_without_triton_never_fails():
    """In a fresh process where `import triton` fails, the package, its modeling and the kernels package import;
    the kernels package lists no modes and "auto" resolves to torch even for CUDA tensors."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None
        import torch
        import hf_linattn
        import hf_linattn.kernels.triton as kernels
        from hf_linattn.kernels import ops
        import hf_linattn.modeling
        assert kernels.SUPPORTED_MODES == kernels.BLOCK_MODES == ()
        assert "the Triton kernels do not import (ModuleNotFoundError" in kernels.CHUNK_UNAVAILABLE
        cuda = torch.device("cuda")
        assert ops.resolve_block_backend("auto", mode="rdn", device=cuda, needs_grad=False) == "torch"
        assert ops.resolve_backend("auto", mode="rdn", device=cuda) == "torch"
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
