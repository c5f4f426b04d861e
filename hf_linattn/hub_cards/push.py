"""Push a converted checkpoint to the Hub as the complete repo ``export_repo`` writes.

The folder is exported into a temporary staging folder (card rendered for the target repo), checked, and
uploaded with ``HfApi.upload_folder`` as one commit (huggingface_hub's ``create_commit``: large files go
to LFS first, and the commit lands whole or not at all). Nothing local changes before the upload
succeeded; then the local README.md becomes the card that was pushed. Refused with one clear error:
no token; a repo that exists with other content (unless ``force``); a failed Hub call, whose message
says what was and was not uploaded. ``dry_run`` prints the file plan and sizes and calls nothing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from huggingface_hub import HfApi

from hf_linattn.errors import HubError
from hf_linattn.fileio import atomic_write_text

from .export import DEFAULT_MAX_SHARD_SIZE, REPORT_NAME, IncompleteCheckpointError, export_repo, file_plan, human_size

T = TypeVar("T")
OUR_TAG = "hf_linattn"  # in the card metadata of every repo we push


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
def staged_export(folder: Path, repo_id: str, max_shard_size: int | str) -> Iterator[Path]:
    """The repo of ``folder`` exported for ``repo_id`` into a temporary folder; removed afterwards."""
    staging = Path(tempfile.mkdtemp(prefix="hf-linattn-push-"))
    try:
        yield export_repo(folder, staging / "repo", repo_id=repo_id, max_shard_size=max_shard_size)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _on_hub(repo_id: str, what: str, call: Callable[[], T], outcome: str = "nothing local changed") -> T:
    """Run a Hub call; any failure (network, auth, offline mode) is one HubError that says what it left."""
    try:
        return call()
    except HubError:
        raise
    except Exception as err:  # the network boundary: every failure here means the same to the user
        from hf_linattn.errors import one_line

        reason = f"{type(err).__name__}: {one_line(err)}"
        raise HubError(f"{what} {repo_id} failed ({reason}); {outcome}") from err


def _resolve_token(token: str | None) -> str:
    from huggingface_hub import get_token

    found = token or get_token()
    if not found:
        raise HubError("no Hub token: set HF_TOKEN, run `hf auth login`, or pass --token; nothing was uploaded")
    return found


def _remote_state(api: HfApi, repo_id: str, force: bool) -> tuple[bool, list[str]]:
    """(the repo exists, its files); refuses a repo whose card is not one of ours unless ``force``."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = api.model_info(repo_id, revision="main")  # (the revision form is what read-only mirrors serve too)
    except RepositoryNotFoundError:
        return False, []
    files = [s.rfilename for s in info.siblings or []]
    tags = (getattr(info.card_data, "tags", None) or []) if info.card_data else []
    other = [f for f in files if f != ".gitattributes"]
    if other and OUR_TAG not in tags and not force:
        shown = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
        raise HubError(f"{repo_id} exists with other content ({shown}), not an hf_linattn export; pass --force to "
                       "replace its files, or choose another --repo-id; nothing was uploaded")  # fmt: skip
    return True, files


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload hf_linattn conversion",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    dry_run: bool = False,
    api: HfApi | None = None,
    say: Callable[[str], None] = print,
) -> str:
    """Export ``folder`` for ``repo_id`` and upload it as one commit on ``revision`` (a branch; default main).

    Returns the commit URL (under ``dry_run``: "dry run"; ``say`` prints the plan). The local README.md is
    replaced by the pushed card only after the upload succeeded.
    """
    folder = Path(folder)
    if not dry_run and api is None:
        api = HfApi(token=_resolve_token(token))  # before the export: a missing token fails at once
    with staged_export(folder, repo_id, max_shard_size) as staging:
        check_exportable(staging, shown=folder)
        plan = file_plan(staging)
        total = sum(size for _, size in plan)
        if dry_run:
            say(f"dry run: {len(plan)} files, {human_size(total)} would go to {repo_id}@{revision or 'main'}")
            for name, size in plan:
                say(f"  {human_size(size):>10}  {name}")
            return "dry run"
        exists, _ = _on_hub(repo_id, "reading", lambda: _remote_state(api, repo_id, force), "nothing was uploaded")
        if not exists:
            _on_hub(repo_id, "creating", lambda: api.create_repo(repo_id, private=private, exist_ok=True),
                    "nothing was uploaded; nothing local changed")  # fmt: skip
        if revision:
            _on_hub(repo_id, f"creating branch {revision} of", lambda: api.create_branch(
                repo_id, branch=revision, exist_ok=True), "nothing was uploaded; nothing local changed")  # fmt: skip
        left = (f"no commit was made, so none of the {len(plan)} files ({human_size(total)}) is on "
                f"{repo_id}@{revision or 'main'}" + ("" if exists else f" (the repo {repo_id} was created, empty)")
                + "; nothing local changed")  # fmt: skip
        info = _on_hub(repo_id, "uploading to", lambda: api.upload_folder(
            folder_path=str(staging), repo_id=repo_id, repo_type="model", revision=revision,
            commit_message=commit_message, delete_patterns=["*"] if exists else None,
        ), left)  # fmt: skip
        card = (staging / "README.md").read_text(encoding="utf-8")
    if (folder / REPORT_NAME).is_file():
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
