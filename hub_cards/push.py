"""Push a converted checkpoint to the Hub, after checking that it loads with trust_remote_code alone."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import HfApi

# The resumable training state stays local: it is large and means nothing to a user of the model.
IGNORED = [".conversion/*", "*.tmp", "_remote_io.safetensors"]


class IncompleteCheckpointError(FileNotFoundError):
    """A folder cannot be pushed: something a trust_remote_code user needs is missing."""


def check_exportable(folder: str | Path) -> list[str]:
    """Raise IncompleteCheckpointError unless ``folder`` has weights, tokenizer, card and remote code.

    Returns the remote-code files named by ``auto_map``.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise IncompleteCheckpointError(f"{folder}: no config.json")
    auto_map = json.loads(config_path.read_text()).get("auto_map") or {}
    needed = {"AutoConfig", "AutoModelForCausalLM"} - set(auto_map)
    if needed:
        raise IncompleteCheckpointError(f"{folder}/config.json: auto_map lacks {sorted(needed)}; save with hf_linattn")
    code = sorted({ref.split(".")[0] + ".py" for ref in auto_map.values()})
    missing = [name for name in code if not (folder / name).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if not (folder / "tokenizer_config.json").is_file():
        missing.append("tokenizer_config.json")
    if not (folder / "README.md").is_file():
        missing.append("README.md (model card)")
    if missing:
        raise IncompleteCheckpointError(f"{folder}: missing {', '.join(missing)}")
    return code


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload hf_linattn conversion",
    api: HfApi | None = None,
) -> str:
    """Create ``repo_id`` (if needed) and upload ``folder`` without its training state. Returns the commit URL."""
    check_exportable(folder)
    api = api or HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type="model", ignore_patterns=IGNORED,
        commit_message=commit_message,
    )  # fmt: skip
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
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        folder_path=str(CUSTOM_GENERATE_DIR / "custom_generate"), path_in_repo="custom_generate", repo_id=repo_id,
        repo_type="model", allow_patterns=["generate.py"], commit_message="Upload lookahead decoding (hf_linattn)",
    )  # fmt: skip
    return str(getattr(info, "commit_url", info))
