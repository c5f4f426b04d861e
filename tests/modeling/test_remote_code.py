"""Saved checkpoints load through trust_remote_code where hf_linattn cannot be imported, and packaging is sound."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer
from transformers.dynamic_module_utils import get_imports, get_relative_imports

from hf_linattn.assets import TEACHER_DIR

from .tiny import HYBRID, prompt, tiny_model

REPO = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter where `import hf_linattn` raises ImportError.
LOAD_WITHOUT_PACKAGE = textwrap.dedent(
    """
    import sys
    sys.modules["hf_linattn"] = None
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoModelForCausalLM

    checkpoint, io_file = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3:  # a tokenizer was saved beside the model: it loads without trust_remote_code
        from transformers import AutoTokenizer
        assert AutoTokenizer.from_pretrained(checkpoint).vocab_size == int(sys.argv[3])
    assert type(AutoModel.from_pretrained(checkpoint, trust_remote_code=True)).__name__ == "LinAttnModel"
    ids = load_file(io_file)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    assert "hf_linattn" not in type(model).__module__.split(".")[0], type(model).__module__
    with torch.no_grad():
        logits = model(ids).logits
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
    save_file({"input_ids": ids, "logits": logits, "greedy": greedy}, io_file)
    print(type(model).__module__)
    """
)


def run_python(code: str, *args: str, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"} | (env_extra or {})
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_checkpoint_loads_without_the_package(tmp_path):
    model = tiny_model(HYBRID, linear_use_rotary=True, qk_norm=True, attention_bias=True)
    checkpoint = tmp_path / "ckpt"
    model.save_pretrained(checkpoint)

    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_linattn.LinAttnForCausalLM"
    assert config["auto_map"]["AutoConfig"] == "configuration_linattn.LinAttnConfig"
    assert config["auto_map"]["AutoModel"] == "modeling_linattn.LinAttnModel"
    code_files = sorted(p.name for p in checkpoint.glob("*.py"))
    expected = {
        "modeling_linattn.py",
        "configuration_linattn.py",
        "cache_linattn.py",
        "layers_linattn.py",
        "linear_attention_linattn.py",
        "ops.py",
        "chunked.py",
        "recurrent.py",
        "decode.py",
        "modes.py",
        "triton_ops.py",
        "triton_block.py",
    }
    assert expected <= set(code_files)
    for name in code_files:  # what transformers checks and copies: no triton outside try blocks, no missing file
        assert "triton" not in get_imports(checkpoint / name), name
        assert all((checkpoint / f"{m}.py").is_file() for m in get_relative_imports(checkpoint / name)), name
    assert not any(p.is_symlink() for p in checkpoint.iterdir()), "remote code must be real files"
    for name in code_files:  # only same-folder relative imports: nothing of hf_linattn
        tree = ast.parse((checkpoint / name).read_text())
        modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]
        modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not any(m.split(".")[0] == "hf_linattn" for m in modules), (name, modules)

    tokenizer = AutoTokenizer.from_pretrained(TEACHER_DIR)
    tokenizer.save_pretrained(checkpoint)
    ids = prompt(2, 75, seed=40)
    io_file = tmp_path / "io.safetensors"
    save_file({"input_ids": ids}, io_file)
    result = run_python(LOAD_WITHOUT_PACKAGE, str(checkpoint), str(io_file), str(tokenizer.vocab_size), cwd=tmp_path,
                        env_extra={"HF_MODULES_CACHE": str(tmp_path / "modules")})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # (without trust_remote_code, transformers asks whether to run the custom code before the tokenizer falls back)
    assert result.stdout.split()[-1].startswith("transformers_modules")
    remote = load_file(io_file)
    with torch.no_grad():
        logits = model(ids).logits
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                pad_token_id=0, eos_token_id=None)  # fmt: skip
    assert torch.equal(remote["logits"], logits)
    assert torch.equal(remote["greedy"], greedy)


# Runs in a fresh interpreter without hf_linattn, with triton importable (the interpreter: TRITON_INTERPRET=1) or
# not (argv[3] == "absent": sys.modules["triton"] = None makes `import triton` raise ImportError).
LOAD_WITH_OR_WITHOUT_TRITON = textwrap.dedent(
    """
    import sys
    sys.modules["hf_linattn"] = None
    if sys.argv[3] == "absent":
        sys.modules["triton"] = None
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    checkpoint, io_file = sys.argv[1], sys.argv[2]
    ids = load_file(io_file)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    ops = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".ops"]  # the checkpoint's own ops.py
    kernels = ops._load_triton()
    if sys.argv[3] == "absent":
        assert kernels is None and "triton package does not import" in ops._triton_cache["reason"]
    else:  # the kernels come from the checkpoint folder; force them on CPU tensors (interpreter)
        assert kernels.__name__.startswith("transformers_modules") and kernels.__name__.endswith(".triton_ops")
        assert set(kernels.BLOCK_MODES) == {"gla", "gdn", "rla", "rdn"}
        resolve = ops.resolve_block_backend
        ops.resolve_block_backend = lambda backend, **kw: resolve("triton", **kw)
        calls = []
        block = kernels.block_residual_attention_triton
        kernels.block_residual_attention_triton = lambda *a, **kw: calls.append(1) or block(*a, **kw)
    with torch.no_grad():
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
    if sys.argv[3] != "absent":
        assert calls, "the block kernel ran"
    save_file({"input_ids": ids, "greedy": greedy}, io_file)
    print(kernels.__name__ if kernels is not None else "torch")
    """
)


@pytest.mark.parametrize("triton", ["importable", "absent"])
def test_checkpoint_carries_the_triton_kernels(tmp_path, triton):
    """The kernels travel as remote code: used where triton imports, skipped (torch path) where it does not."""
    if triton == "importable":
        pytest.importorskip("triton")
    model = tiny_model(HYBRID)
    checkpoint = tmp_path / "ckpt"
    model.save_pretrained(checkpoint)
    ids = prompt(1, 7, seed=41)
    io_file = tmp_path / "io.safetensors"
    save_file({"input_ids": ids}, io_file)
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "TRITON_INTERPRET": "1"}
    result = run_python(LOAD_WITH_OR_WITHOUT_TRITON, str(checkpoint), str(io_file), triton, cwd=tmp_path,
                        env_extra=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    used = result.stdout.split()[-1]  # "torch", or the name of the kernels module that was used
    assert (used == "torch") if triton == "absent" else used.startswith("transformers_modules")
    with torch.no_grad():
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                pad_token_id=0, eos_token_id=None)  # fmt: skip
    assert torch.equal(load_file(io_file)["greedy"], greedy)


def test_optional_kernel_files_absent_from_the_build_are_dropped(tmp_path):
    """A guarded import of a file that does not exist becomes the ModuleNotFoundError it would raise."""
    from hf_linattn.modeling.export import write_remote_code

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "entry.py").write_text(
        "try:\n    from .not_built import f\nexcept ImportError:\n    f = None\nfrom .helper import g\n"
    )
    (tmp_path / "src" / "helper.py").write_text("g = 1\n")
    names = write_remote_code(tmp_path / "out", [tmp_path / "src" / "entry.py"])
    assert names == ["entry.py", "helper.py"]
    text = (tmp_path / "out" / "entry.py").read_text()
    assert "from .not_built" not in text and "raise ModuleNotFoundError('not_built is not part" in text
    assert get_relative_imports(tmp_path / "out" / "entry.py") == ["helper"]
    namespace: dict = {}
    exec(compile(text.replace("from .helper import g", "g = 1"), "entry.py", "exec"), namespace)
    assert namespace["f"] is None
    (tmp_path / "src" / "bad.py").write_text("from .not_built import f\n")  # unguarded: an error
    with pytest.raises(ImportError, match=r"imports \.not_built, which cannot be found"):
        write_remote_code(tmp_path / "out2", [tmp_path / "src" / "bad.py"])


def test_missing_weights_file_gets_a_clear_error(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(["rdn"])
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(OSError, match=r"model\.safetensors|no file named"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_the_package_has_no_symlinks_and_one_module_per_file():
    """Every source file is one module at runtime: no symlinks, and no file imported under two names."""
    import hf_linattn.conversion
    import hf_linattn.generation
    import hf_linattn.hub_cards
    import hf_linattn.kernels.block
    import hf_linattn.modeling  # noqa: F401

    def ours(path: Path) -> bool:
        return not any(part.startswith((".venv", ".git")) for part in path.relative_to(REPO).parts)

    links = [p for p in REPO.rglob("*.py") if p.is_symlink() and ours(p)]
    assert not links, links
    files = [Path(m.__file__) for m in list(sys.modules.values()) if getattr(m, "__file__", None)]
    files = [f.resolve() for f in files if f.is_absolute()]  # (some builtin modules name a bare file)
    package_files = [f for f in files if REPO in f.parents and ours(f)]
    assert len(package_files) == len(set(package_files)) > 20, sorted(str(f) for f in package_files)


@pytest.mark.slow
def test_built_wheel_installs_the_namespaced_packages(tmp_path):
    """The wheel holds hf_linattn.{modeling,kernels,...} with real files, and no top-level kernels/modeling."""
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheel_dir)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(wheel_dir.glob("hf_linattn-*.whl"))
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    assert not (target / "kernels").exists() and not (target / "modeling").exists()
    assert not (target / "hf_linattn" / "modeling" / "ops.py").is_symlink()
    code = textwrap.dedent(
        """
        import importlib.util, sys
        import hf_linattn, hf_linattn.kernels, hf_linattn.modeling
        assert hf_linattn.__file__.startswith(sys.argv[1]), hf_linattn.__file__
        assert hf_linattn.kernels.__file__.startswith(sys.argv[1])
        spec = importlib.util.find_spec("kernels")
        assert spec is None or not spec.origin.startswith(sys.argv[1]), spec
        print("ok")
        """
    )
    result = run_python(code, str(target), cwd=tmp_path, env_extra={"PYTHONPATH": str(target)})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
