"""Push a converted checkpoint to the Hub, after checking that it loads with trust_remote_code alone.

Nothing local changes before the upload succeeds: the folder is mirrored (file symlinks) into a
temporary staging folder, the model card is rendered there for the target repo, and the staging
folder is uploaded. Only then is the new card written into the local folder.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from huggingface_hub import HfApi

from hf_linattn.errors import HubError, InputError, one_line
from hf_linattn.fileio import atomic_write_text, read_json_state

# The resumable training state stays local: it is large and means nothing to a user of the model.
IGNORED = [".conversion/*", "*.tmp", "_remote_io.safetensors"]
REPORT_NAME = "conversion_report.json"  # written by hf_linattn.conversion (not imported: it loads torch)
T = TypeVar("T")


class IncompleteCheckpointError(InputError, FileNotFoundError):
    """A folder cannot be pushed: something a trust_remote_code user needs is missing."""


def check_exportable(folder: str | Path, shown: str | Path | None = None) -> list[str]:
    """Raise IncompleteCheckpointError unless ``folder`` has weights, tokenizer, card and remote code.

    ``shown`` is the folder named in messages (the user's folder when ``folder`` is a staging copy).
    Returns the remote-code files named by ``auto_map``.
    """
    folder = Path(folder)
    shown = shown or folder
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise IncompleteCheckpointError(f"{shown}: no config.json")
    auto_map = json.loads(config_path.read_text()).get("auto_map") or {}
    needed = {"AutoConfig", "AutoModelForCausalLM"} - set(auto_map)
    if needed:
        raise IncompleteCheckpointError(f"{shown}/config.json: auto_map lacks {sorted(needed)}; save with hf_linattn")
    code = sorted({ref.split(".")[0] + ".py" for ref in auto_map.values()})
    missing = [name for name in code if not (folder / name).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if not (folder / "tokenizer_config.json").is_file():
        missing.append("tokenizer_config.json")
    if not (folder / "README.md").is_file():
        missing.append("README.md (model card)")
    if missing:
        raise IncompleteCheckpointError(f"{shown}: missing {', '.join(missing)}")
    return code


@contextmanager
def staged_copy(folder: Path) -> Iterator[Path]:
    """A temporary mirror of ``folder`` (real folders, symlinked files, IGNORED left out); removed afterwards."""
    staging = Path(tempfile.mkdtemp(prefix="hf-linattn-push-"))
    try:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder).as_posix()
            if path.is_dir() or any(fnmatch.fnmatch(rel, pattern) for pattern in IGNORED):
                continue
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).symlink_to(path.resolve())
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _on_hub(repo_id: str, what: str, call: Callable[[], T]) -> T:
    """Run a Hub call; any failure (network, auth, offline mode) is one HubError saying nothing local changed."""
    try:
        return call()
    except Exception as err:  # the network boundary: every failure here means the same to the user
        reason = f"{type(err).__name__}: {one_line(err)}"
        raise HubError(f"{what} {repo_id} failed ({reason}); nothing local changed") from err


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload hf_linattn conversion",
    api: HfApi | None = None,
) -> str:
    """Create ``repo_id`` (if needed) and upload ``folder`` without its training state. Returns the commit URL.

    A folder with a conversion report gets its card rendered for ``repo_id``; the local README.md
    is replaced by that card only once the upload succeeded.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise IncompleteCheckpointError(f"{folder}: no such folder")
    card = None
    if (folder / REPORT_NAME).is_file():
        from .card import render_model_card

        report = read_json_state(folder / REPORT_NAME, "convert the checkpoint again")
        card = str(render_model_card(report, repo_id))
    with staged_copy(folder) as staging:
        if card is not None:
            (staging / "README.md").unlink(missing_ok=True)
            (staging / "README.md").write_text(card, encoding="utf-8")
        check_exportable(staging, shown=folder)
        api = api or HfApi(token=token)
        _on_hub(repo_id, "creating", lambda: api.create_repo(repo_id, private=private, exist_ok=True))
        info = _on_hub(repo_id, "uploading to", lambda: api.upload_folder(
            folder_path=str(staging), repo_id=repo_id, repo_type="model", ignore_patterns=IGNORED,
            commit_message=commit_message,
        ))  # fmt: skip
    if card is not None:
        atomic_write_text(folder / "README.md", card)
    return str(getattr(info, "commit_url", info))


def push_custom_generate(
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Upload the lookahead-decoding ``custom_generate/generate.py`` to ``repo_id``.

    Users then call ``model.generate(ids, custom_generate=repo_id, trust_remote_code=True)`` with any
    causal LM, hf_linattn not installed. Returns the commit URL.
    """
    from hf_linattn.generation import CUSTOM_GENERATE_DIR

    api = api or HfApi(token=token)
    _on_hub(repo_id, "creating", lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
    info = _on_hub(repo_id, "uploading to", lambda: api.upload_folder(
        folder_path=str(CUSTOM_GENERATE_DIR / "custom_generate"), path_in_repo="custom_generate", repo_id=repo_id,
        repo_type="model", allow_patterns=["generate.py"], commit_message="Upload lookahead decoding (hf_linattn)",
    ))  # fmt: skip
    return str(getattr(info, "commit_url", info))
