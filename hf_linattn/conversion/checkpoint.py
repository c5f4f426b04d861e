"""Resumable training state in safetensors (never pickle): parameters, optimizer moments, step, losses.

A stage writes its state every ``every`` steps with an atomic rename, so a run killed at any
moment (kill -9 included) leaves either the previous state or the new one, never half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hf_linattn.errors import StateFileError, one_line

RESTART_HINT = "pass --restart to discard the unfinished conversion"


@contextlib.contextmanager
def reading_state(path: Path) -> Iterator[None]:
    """Turn a damaged (truncated, edited) state file into one StateFileError that names it and the fix."""
    try:
        yield
    except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as err:
        raise StateFileError(f"{path} is damaged ({one_line(err)}); {RESTART_HINT}") from err


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """save_file through a temporary file and a rename: a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


@dataclass
class StageCheckpoint:
    """Where and how often one training stage saves itself. ``path`` is a .safetensors file."""

    path: Path
    every: int = 25

    def save(
        self, step: int, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, history: list[float]
    ) -> None:
        """Save after ``step`` optimizer steps are done."""
        state = optimizer.state_dict()
        tensors = {f"param/{name}": p for name, p in params.items()}
        for index, moments in state["state"].items():
            for key, value in moments.items():
                tensors[f"optim/{index}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        metadata = {
            "step": str(step),
            "history": json.dumps(history),
            "param_groups": json.dumps(state["param_groups"]),
            "param_names": json.dumps(list(params)),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(tensors, self.path, metadata)

    def restore(self, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> tuple[int, list]:
        """Load a saved state into ``params`` and ``optimizer``; returns (steps done, loss history). (0, []) if none."""
        if not self.path.exists():
            return 0, []
        with reading_state(self.path), safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata()
            names = json.loads(meta["param_names"])
            if names != list(params):
                raise StateFileError(
                    f"{self.path} holds parameters for another setup ({len(names)} saved, {len(params)} now); "
                    f"{RESTART_HINT}"
                )
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(f.get_tensor(f"param/{name}"))
            moments: dict[int, dict[str, torch.Tensor]] = {}
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key.startswith("optim/"):
                    _, index, name = key.split("/", 2)
                    moments.setdefault(int(index), {})[name] = f.get_tensor(key)
        optimizer.load_state_dict({"state": moments, "param_groups": json.loads(meta["param_groups"])})
        return int(meta["step"]), json.loads(meta["history"])
