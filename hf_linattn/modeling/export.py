"""Assemble a checkpoint's remote code: one flat folder of files that imports nothing of hf_linattn.

transformers loads remote code from the checkpoint folder and follows only same-folder relative
imports (``from .x import y``). In the package, the modeling files import the op files across
folders by their full names (``from hf_linattn.kernels.ops import residual_attention``). This
module walks those imports from the entry files, copies every file reached into the checkpoint
folder, and rewrites ``from hf_linattn.<part>[.<sub>].<module> import`` into ``from .<module> import``
(file names are unique package-wide for that). The Triton kernels (``kernels/triton/triton_*.py``) come
along through ``ops.py``'s guarded imports; an optional kernel file absent from this build is dropped.
It also runs inside a checkpoint's own remote code (re-saving a model loaded with
``trust_remote_code=True``), where every import is already relative.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

PACKAGE = "hf_linattn"
_PACKAGE_IMPORT = re.compile(rf"^(\s*)from\s+{PACKAGE}(?:\.\w+)+\.(\w+)\s+import\b", flags=re.MULTILINE)
_IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}


def _guarded_imports(tree: ast.AST) -> set[int]:
    """ids of the ``from ... import`` nodes inside the body of a ``try`` that catches ImportError."""
    guarded = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        caught = set()
        for handler in node.handlers:
            types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
            caught |= {t.id for t in types if isinstance(t, ast.Name)}
        if caught & _IMPORT_ERRORS:
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt) if isinstance(n, ast.ImportFrom)}
    return guarded


def _imported_files(source_file: Path) -> tuple[list[Path], list[ast.ImportFrom]]:
    """Files ``source_file`` imports from its own folder (``from .x``) or from the package (``hf_linattn.p[.q].x``),
    and the optional imports among them whose file does not exist (inside a ``try`` that catches ImportError:
    a kernel not part of this build). A missing file imported without such a guard is an error."""
    tree = ast.parse(source_file.read_text(encoding="utf-8"), filename=str(source_file))
    guarded = _guarded_imports(tree)
    found, absent = [], []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or node.module is None:
            continue
        path = None
        if node.level == 1 and "." not in node.module:
            path = source_file.parent / f"{node.module}.py"
            path = path if path.is_file() else None
        elif node.level == 0 and node.module.startswith(f"{PACKAGE}.") and node.module.count(".") >= 2:
            spec = importlib.util.find_spec(node.module)
            if spec is not None and spec.origin is not None:
                path = Path(spec.origin)
                if path.name == "__init__.py":
                    raise ValueError(f"{source_file.name}: remote code must import modules, not the package "
                                     f"{node.module}")  # fmt: skip
        elif node.level > 0 or node.module.split(".")[0] == PACKAGE:
            raise ValueError(f"{source_file.name}: remote code may import only .<module> and "
                             f"hf_linattn.<part>[.<sub>].<module>; got {'.' * node.level}{node.module}")  # fmt: skip
        else:
            continue
        if path is not None:
            found.append(path)
        elif id(node) in guarded and node.lineno == node.end_lineno:
            absent.append(node)
        else:
            raise ImportError(f"{source_file.name} imports {'.' * node.level}{node.module}, which cannot be found")
    return found, absent


def remote_code_files(entry_files: list[Path]) -> dict[str, Path]:
    """Every file the entry files need, by the name it takes in the flat folder."""
    files: dict[str, Path] = {}
    pending = [Path(f).resolve() for f in entry_files]
    while pending:
        path = pending.pop()
        if path.name in files:
            if files[path.name] != path:
                raise ValueError(f"two remote-code files share the name {path.name}: {files[path.name]} and {path}")
            continue
        files[path.name] = path
        pending.extend(p.resolve() for p in _imported_files(path)[0])
    return files


def flatten_imports(source: str) -> str:
    """``from hf_linattn.<part>[.<sub>].<module> import`` -> ``from .<module> import``."""
    return _PACKAGE_IMPORT.sub(r"\1from .\2 import", source)


def _drop_absent_imports(source: str, absent: list[ast.ImportFrom]) -> str:
    """Each optional import of a missing file becomes the ModuleNotFoundError it would raise.

    transformers copies every file named by a ``from .x import`` line of remote code (guarded or not) and
    fails when one is missing, so the line itself must go; its ``except ImportError`` branch then runs.
    """
    lines = source.splitlines(keepends=True)
    for node in absent:
        name = node.module.split(".")[-1]
        line = lines[node.lineno - 1]
        indent = line[: len(line) - len(line.lstrip())]
        message = f"{name} is not part of this checkpoint"
        lines[node.lineno - 1] = f"{indent}raise ModuleNotFoundError({message!r}, name={name!r})\n"
    return "".join(lines)


def write_remote_code(folder: str | Path, entry_files: list[Path]) -> list[str]:
    """Write the entry files and everything they import into ``folder`` as real files; return their names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for name, source in sorted(remote_code_files(entry_files).items()):
        target = folder / name
        text = _drop_absent_imports(source.read_text(encoding="utf-8"), _imported_files(source)[1])
        text = flatten_imports(text)
        if target.is_symlink():
            target.unlink()
        target.write_text(text, encoding="utf-8")
        names.append(name)
    return names


# save_pretrained keywords that only matter when pushing (transformers pops them itself when it pushes)
HUB_KWARGS = ("repo_id", "commit_message", "private", "token", "create_pr", "revision", "commit_description")


def split_hub_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """(save keywords, hub keywords) of a save_pretrained call."""
    hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    return {k: v for k, v in kwargs.items() if k not in hub}, hub


def push_folder(
    folder: str | Path,
    *,
    repo_id: str | None = None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    revision: str | None = None,
    commit_description: str | None = None,
) -> None:
    """Upload a saved folder (remote code included) the way save_pretrained(push_to_hub=True) would.

    Only called on request; HfApi comes through transformers, so the remote code imports nothing but
    torch, transformers, the standard library and (optionally) triton."""
    from transformers.utils.hub import HfApi

    api = HfApi(token=token)
    repo_id = repo_id or Path(folder).resolve().name
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message or "Upload model",
                      commit_description=commit_description, create_pr=create_pr, revision=revision)  # fmt: skip


__all__ = ["flatten_imports", "push_folder", "remote_code_files", "split_hub_kwargs", "write_remote_code"]
