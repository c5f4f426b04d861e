"""Small file helpers shared by the conversion, the evaluation and the Hub push: atomic writes, checked reads.

Plain Python (no torch), so the CLI and the Hub code can use them cheaply.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hf_linattn.errors import StateFileError


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a crash leaves the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, data: Any) -> None:
    """``data`` as indented JSON, written atomically."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def read_json_state(path: str | Path, fix: str) -> Any:
    """Parse a JSON state file; a damaged one raises StateFileError naming the file and ``fix``."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StateFileError(f"{path} is damaged ({_reason(err)}); {fix}") from err


def _reason(err: Exception) -> str:
    if isinstance(err, json.JSONDecodeError):
        return f"invalid JSON at line {err.lineno} column {err.colno}"
    return type(err).__name__ + (f": {err.strerror}" if isinstance(err, OSError) and err.strerror else "")


__all__ = ["atomic_write_json", "atomic_write_text", "read_json_state"]
