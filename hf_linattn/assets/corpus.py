"""The embedded corpus: the Python standard library's own source, present on every machine with Python.

Files are listed in a fixed order and split by a hash of their relative path, so every machine
agrees on which files are held out. The held-out text itself is committed (``heldout.txt``), so
perplexities stay reproducible even where the local stdlib differs.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

# Folders that are tests, vendored data or GUI tooling rather than ordinary library code.
EXCLUDED_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "lib2to3", "__pycache__"}
HELDOUT_EVERY = 16  # one file in 16 (by path hash) is held out
HELDOUT_MAX_BYTES = 512 * 1024
DOCUMENT_SEPARATOR = "<|endoftext|>"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Every library ``.py`` file under the stdlib root, sorted by relative path."""
    root = root or stdlib_root()
    files = [p for p in root.rglob("*.py") if not EXCLUDED_PARTS & set(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_heldout(relative_path: str) -> bool:
    return int(hashlib.sha256(relative_path.encode()).hexdigest(), 16) % HELDOUT_EVERY == 0


def read_source(path: Path) -> str | None:
    """The file's text, or None for files that are not UTF-8 (a few stdlib test fixtures)."""
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def training_documents(root: Path | None = None) -> Iterator[tuple[str, str]]:
    """(relative path, text) of every training (not held-out) file, in a fixed order."""
    root = root or stdlib_root()
    for path in stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        if is_heldout(rel):
            continue
        text = read_source(path)
        if text:
            yield rel, text


def heldout_documents(root: Path | None = None, max_bytes: int = HELDOUT_MAX_BYTES) -> list[tuple[str, str]]:
    """(relative path, text) of held-out files, in order, until ``max_bytes`` of UTF-8 text."""
    root = root or stdlib_root()
    docs, total = [], 0
    for path in stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        text = read_source(path) if is_heldout(rel) else None
        if not text:
            continue
        size = len(text.encode())
        if total + size > max_bytes:
            continue
        docs.append((rel, text))
        total += size
    return docs


def corpus_sha256(documents: list[tuple[str, str]]) -> str:
    """One hash over the documents' paths and texts, so a run records exactly what it saw."""
    digest = hashlib.sha256()
    for rel, text in documents:
        digest.update(rel.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()
