"""Where a conversion writes: never over anything it was not asked to replace, and never half a checkpoint.

A run builds everything in ``DIR.partial/`` beside the output ``DIR``: the checkpoint files as they
are made and, in ``DIR.partial/.conversion/``, the resumable state (``recipe.json``, the stages'
safetensors). A crashed run (kill -9 included) leaves ``DIR.partial/``; the same command finds it
and resumes. At the end the state files are dropped, ``.conversion/manifest.json`` lists the
files of the run, and ``DIR.partial`` is renamed to ``DIR``. ``DIR`` therefore only ever holds a
finished conversion (or what was there before).

``plan_output`` only reads, so every process of a multi-process run reaches the same decision
before the main process changes anything. It refuses, with one message each:

- an ``--output`` that is or contains an input (the base, ``--tokenizer``, ``--data``), or the
  current directory: always;
- an ``--output`` holding anything but a finished conversion of ours: unless ``--overwrite``;
- a finished conversion with another recipe: unless ``--restart`` (or ``--overwrite``);
- an unfinished one (``DIR.partial``) with another recipe: unless ``--restart``, which discards it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_linattn.errors import OutputFolderError, StateFileError
from hf_linattn.fileio import atomic_write_json, read_json_state

WORK_DIR = ".conversion"
REPORT_NAME = "conversion_report.json"
RECIPE_NAME = "recipe.json"
MANIFEST_NAME = "manifest.json"
PARTIAL_SUFFIX = ".partial"
# Written into a finished output later by ``hf-linattn eval``: part of that run, and cleared with it.
DERIVED_FILES = ("eval_report.json",)


class RecipeMismatchError(OutputFolderError, ValueError):
    """The output holds a conversion (finished or not) made with a different recipe."""


@dataclass(frozen=True)
class OutputPlan:
    """What a conversion into ``target`` will do. ``action``: start, resume, finalize (only the rename left) or done."""

    target: Path
    build: Path
    action: str
    discard_build: bool = False

    @property
    def work(self) -> Path:
        """The resumable state folder of the run being built."""
        return self.build / WORK_DIR


def build_dir(target: Path) -> Path:
    """``DIR.partial`` beside ``DIR``: same folder, so the final rename stays on one filesystem."""
    return target.with_name(target.name + PARTIAL_SUFFIX)


def _files(folder: Path) -> list[str]:
    """Relative paths of the files under ``folder``, without the state folder."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if (p.is_file() or p.is_symlink()) and WORK_DIR not in p.relative_to(folder).parts
    )


def _names(items: list[str], limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _recipe_diff(saved: dict[str, Any], now: dict[str, Any]) -> str:
    keys = [k for k in dict.fromkeys([*saved, *now]) if saved.get(k) != now.get(k)]
    return "; ".join(f"{k}: {saved.get(k)!r} then, {now.get(k)!r} now" for k in keys)


def _check_inputs(target: Path, inputs: list[tuple[str, Path]]) -> None:
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise OutputFolderError(f"--output {target} is the current directory or holds it; choose another --output")
    for label, path in inputs:
        path = path.resolve()
        if path == target or target in path.parents:
            verb = "is" if path == target else "holds"
            raise OutputFolderError(
                f"--output {target} {verb} the {label} {path}; a conversion never writes over its inputs: "
                "choose another --output"
            )


def _target_state(target: Path, replace_ok: bool) -> tuple[str, dict | None, list[str]]:
    """("absent" | "ours" | "foreign", the manifest of ours, entries that are not ours)."""
    if not (target.exists() or target.is_symlink()):
        return "absent", None, []
    if not target.is_dir():
        raise OutputFolderError(f"--output {target} exists and is not a folder; choose another --output")
    manifest_path = target / WORK_DIR / MANIFEST_NAME
    if manifest_path.exists():
        try:
            fix = "pass --restart to replace this output, or choose another --output"
            manifest = read_json_state(manifest_path, fix)
        except StateFileError:
            if replace_ok:
                return "ours", None, []
            raise
        foreign = sorted(set(_files(target)) - set(manifest.get("files", [])) - set(DERIVED_FILES))
        return "ours", manifest, foreign
    entries = sorted(p.name for p in target.iterdir())
    return ("foreign", None, entries) if entries else ("absent", None, [])


def _build_state(build: Path, restart: bool) -> tuple[str, dict | None]:
    """("absent" | "unfinished" | "finished", the saved recipe) of ``DIR.partial``."""
    if not (build.exists() or build.is_symlink()):
        return "absent", None
    if not build.is_dir():
        raise OutputFolderError(f"{build} exists and is not a folder; remove it or choose another --output")
    if not any(p.is_file() for p in build.rglob("*")):
        return "absent", None  # a run that died between mkdir and writing its recipe
    recipe_path = build / WORK_DIR / RECIPE_NAME
    if not recipe_path.exists():
        raise OutputFolderError(
            f"{build} exists and is not an unfinished hf-linattn conversion; remove it or choose another --output"
        )
    if restart:
        return "absent", None  # discarded below, whatever state it is in
    recipe = read_json_state(recipe_path, "pass --restart to discard the unfinished conversion")
    finished = (build / WORK_DIR / MANIFEST_NAME).exists()
    return ("finished" if finished else "unfinished"), recipe


def plan_output(
    output: str | Path,
    recipe: dict[str, Any],
    inputs: list[tuple[str, Path]],
    restart: bool = False,
    overwrite: bool = False,
) -> OutputPlan:
    """Decide what a conversion into ``output`` does; raise OutputFolderError (or a subclass) to refuse. Reads only.

    inputs: (label, local path) of everything the run reads, which the output must not hold.
    """
    target = Path(output).expanduser().resolve()
    if target.parent == target:
        raise OutputFolderError(f"--output {target} is a filesystem root; choose a folder inside it")
    build = build_dir(target)
    _check_inputs(target, inputs)
    kind, manifest, foreign = _target_state(target, replace_ok=restart or overwrite)
    if kind == "foreign" and not overwrite:
        raise OutputFolderError(
            f"--output {target} is not empty and holds no hf-linattn conversion ({_names(foreign)}); "
            "pass --overwrite to replace its whole content, or choose another --output"
        )
    discard = restart and (build.exists() or build.is_symlink())
    state, saved = _build_state(build, restart)
    if state != "absent":
        if saved != recipe:
            raise RecipeMismatchError(
                f"{build} holds an unfinished conversion with another recipe ({_recipe_diff(saved, recipe)}); "
                "rerun with the same settings to resume it, pass --restart to discard it, or choose another --output"
            )
        # resuming a run that was allowed to replace our own finished output when it started
        action = "finalize" if state == "finished" else "resume"
    elif kind == "ours" and not (restart or overwrite):
        if manifest is not None and manifest.get("recipe") != recipe:
            raise RecipeMismatchError(
                f"{target} holds a finished conversion with another recipe "
                f"({_recipe_diff(manifest.get('recipe') or {}, recipe)}); "
                "pass --restart to replace it, or choose another --output"
            )
        return OutputPlan(target, build, "done")
    else:
        action = "start"
    if kind == "ours" and foreign and not overwrite:
        raise OutputFolderError(
            f"--output {target} holds files that are not part of its conversion ({_names(foreign)}); "
            "move them away, or pass --overwrite to replace the folder with them"
        )
    return OutputPlan(target, build, action, discard_build=discard)


def prepare_build(plan: OutputPlan, recipe: dict[str, Any]) -> None:
    """Main process: discard the old build folder on --restart, create a new one with its recipe."""
    if plan.discard_build:
        shutil.rmtree(plan.build)
    if plan.action == "start":
        plan.work.mkdir(parents=True, exist_ok=True)
        atomic_write_json(plan.work / RECIPE_NAME, recipe)


def finalize(plan: OutputPlan, recipe: dict[str, Any]) -> None:
    """Main process: mark the build finished, drop its training state and rename it into place.

    Each step is safe to interrupt: a finished build (manifest written) is renamed by the next run
    of the same command; the replaced output is moved inside the build before the rename and
    deleted last.
    """
    work, trash = plan.work, plan.work / "replaced"
    if not (work / MANIFEST_NAME).exists():
        atomic_write_json(work / MANIFEST_NAME, {"recipe": recipe, "files": _files(plan.build)})
    for path in work.iterdir():
        if path.name not in (RECIPE_NAME, MANIFEST_NAME):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if plan.target.exists() or plan.target.is_symlink():
        os.replace(plan.target, trash)
    os.replace(plan.build, plan.target)
    shutil.rmtree(plan.target / WORK_DIR / "replaced", ignore_errors=True)


__all__ = [
    "DERIVED_FILES",
    "MANIFEST_NAME",
    "RECIPE_NAME",
    "REPORT_NAME",
    "WORK_DIR",
    "OutputPlan",
    "RecipeMismatchError",
    "build_dir",
    "finalize",
    "plan_output",
    "prepare_build",
]
