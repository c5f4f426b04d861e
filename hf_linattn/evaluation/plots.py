"""What every benchmark plot shares: matplotlib checked before the work, drawn off-screen, saved small."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from hf_linattn.errors import InputError


def require_matplotlib() -> None:
    """Raise InputError naming the extra to install when matplotlib is missing (checked before any training)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise InputError("the benchmark's plot needs matplotlib: pip install 'hf-linattn[bench]' (or pip install "
                         "matplotlib)")  # fmt: skip


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, **layout: Any) -> Path:
    """Lay out ``fig``, write it as a small PNG at ``path`` (folders made), close it; returns the path."""
    fig.tight_layout(**layout)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    pyplot().close(fig)
    return path
