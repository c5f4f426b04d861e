"""Model card rendering and Hub push (the HfApi calls are recorded, since no hub is reachable here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hf_linattn.cli import main
from hf_linattn.hub_cards import IncompleteCheckpointError, check_exportable, push_to_hub, render_model_card
from tests.clitools import assert_one_line_error, snapshot

REPORT = {
    "teacher_perplexity": 12.3456, "student_perplexity": 13.5, "perplexity_ratio": 1.0935, "heldout_tokens": 4096,
    "greedy_agreement": {"token_agreement": 0.625, "mean_agreeing_prefix": 7.5},
    "line_completion": {"prompts": 64, "max_new_tokens": 32, "exact_match": 0.0938, "teacher_exact_match": 0.1406,
                        "same_as_teacher": 0.4219},
    "recipe": {"base": "Qwen/Qwen3-0.6B", "mode": "rdn", "keep_softmax": 1, "keep_softmax_layers": None,
               "attention_transfer_steps": 10, "attention_transfer_lr": 0.01, "lora_steps": 20, "lora_lr": 0.001,
               "lora_rank": 8, "lora_alpha": 16, "lora_mlp": True, "loss": "kl", "batch_size": 4, "seq_len": 512,
               "linear_use_rotary": False, "residual_clip": 1.0, "seed": 0},
    "num_layers": 4, "layer_types": ["rdn", "rdn", "full_attention", "rdn"], "kept_softmax_layers": [2],
    "stage1_layer_errors": [0.1, 0.2, 0.9, 0.3], "train_tokens_seen": {"attention_transfer": 20480, "lora": 40960},
}  # fmt: skip


class RecordingApi:
    """Records the calls and, at upload time, what the uploaded folder holds (it is a temporary staging copy)."""

    def __init__(self, fail_upload: bool = False):
        self.calls = []
        self.uploaded: dict[str, bytes] = {}
        self.fail_upload = fail_upload

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        root = Path(kwargs["folder_path"])
        self.uploaded = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        if self.fail_upload:
            raise ConnectionError("the Hub is unreachable")
        return "https://huggingface.co/me/model/commit/abc"


def test_card_metadata_and_figures():
    card = render_model_card(REPORT, repo_id="me/qwen3-rdn")
    meta = yaml.safe_load(str(card).split("---")[1])
    assert meta["base_model"] == "Qwen/Qwen3-0.6B" and meta["library_name"] == "transformers"
    assert "rdn" in meta["tags"] and meta["pipeline_tag"] == "text-generation"
    text = str(card)
    assert '"me/qwen3-rdn", trust_remote_code=True' in text
    assert "12.346" in text and "13.500 (1.093x)" in text and "62.5%" in text
    assert "| error | 0.1000 | 0.2000 | 0.9000 | 0.3000 |" in text
    assert "highest stage-1 error" in text and "+ MLP" in text
    assert "| model | perplexity | line exact match |" in text and "| 13.500 (1.093x) | 9.4% |" in text
    assert "| 12.346 | 14.1% |" in text and "of 64 held-out code lines" in text and "on\n42.2% of them" in text
    # a report from before the line-completion metric still renders, without its column
    old = render_model_card({k: v for k, v in REPORT.items() if k != "line_completion"})
    assert "| model | perplexity |\n|---|---|\n" in str(old) and "line exact match" not in str(old)


@pytest.fixture
def exported(tmp_path):
    """A converted-looking folder made by saving a tiny model with hf_linattn (remote code included)."""
    from transformers import AutoTokenizer

    from hf_linattn.assets import TEACHER_DIR
    from tests.modeling.tiny import tiny_model

    folder = tmp_path / "model"
    tiny_model(["rdn", "full_attention"]).save_pretrained(folder)
    AutoTokenizer.from_pretrained(TEACHER_DIR).save_pretrained(folder)
    (folder / "conversion_report.json").write_text(json.dumps(REPORT))
    (folder / ".conversion").mkdir()
    (folder / ".conversion" / "stage1.safetensors").write_bytes(b"state")
    return folder


def test_push_uploads_the_checkpoint_without_training_state(exported):
    (exported / "README.md").write_text("card")
    api = RecordingApi()
    url = push_to_hub(exported, "me/tiny", private=True, api=api)
    assert url.endswith("/commit/abc")
    (kind0, repo0, kw0), (kind1, _, kw1) = api.calls
    assert (kind0, repo0, kw0["private"], kw0["exist_ok"]) == ("create_repo", "me/tiny", True, True)
    assert kind1 == "upload_folder" and kw1["folder_path"] != str(exported)  # a staging copy
    assert not Path(kw1["folder_path"]).exists()  # removed afterwards
    assert ".conversion/*" in kw1["ignore_patterns"]
    assert not any(name.startswith(".conversion") for name in api.uploaded)
    expected = {p.relative_to(exported).as_posix(): p.read_bytes() for p in exported.glob("*") if p.is_file()}
    assert api.uploaded == expected  # every file, the card rendered for the repo (now also written locally)
    assert b'"me/tiny", trust_remote_code=True' in api.uploaded["README.md"]


def test_cli_push_rerenders_the_card_for_the_repo(exported, monkeypatch):
    api = RecordingApi()
    monkeypatch.setattr("hf_linattn.hub_cards.push.HfApi", lambda token=None: api)
    assert main(["push", str(exported), "--repo-id", "me/tiny"]) == 0
    assert '"me/tiny", trust_remote_code=True' in (exported / "README.md").read_text()
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]


def test_report_name_matches_the_conversion():
    from hf_linattn.conversion.output import REPORT_NAME
    from hf_linattn.hub_cards.push import REPORT_NAME as PUSHED_REPORT_NAME

    assert PUSHED_REPORT_NAME == REPORT_NAME


def test_failed_upload_changes_nothing_local(exported, monkeypatch, capsys):
    (exported / "README.md").write_text("the user's own card")
    before = snapshot(exported)
    api = RecordingApi(fail_upload=True)
    monkeypatch.setattr("hf_linattn.hub_cards.push.HfApi", lambda token=None: api)
    assert main(["push", str(exported), "--repo-id", "me/tiny"]) == 1
    assert b'"me/tiny"' in api.uploaded["README.md"]  # the card was rendered, in the staging copy only
    assert snapshot(exported) == before
    assert_one_line_error(capsys.readouterr().err, "uploading to me/tiny failed", "nothing local changed")


def test_push_cli_offline_is_one_line_and_leaves_every_byte(exported, tmp_path):
    """Through the installed command, with the Hub unreachable (offline mode): one line, exit 1, files untouched."""
    (exported / "README.md").write_text("the user's own card")
    before = snapshot(exported)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_fake"}
    result = subprocess.run([sys.executable, "-m", "hf_linattn.cli", "push", str(exported), "--repo-id", "me/tiny"],
                            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert_one_line_error(result.stderr, "creating me/tiny failed", "nothing local changed")
    assert snapshot(exported) == before


def test_incomplete_folder_is_not_pushed(exported):
    with pytest.raises(IncompleteCheckpointError, match=r"README\.md"):
        check_exportable(exported)  # no card yet
    (exported / "README.md").write_text("card")
    code = check_exportable(exported)
    assert "modeling_linattn.py" in code and "configuration_linattn.py" in code
    (exported / "modeling_linattn.py").unlink()
    with pytest.raises(IncompleteCheckpointError, match=r"modeling_linattn\.py"):
        push_to_hub(exported, "me/tiny", api=RecordingApi())


def test_push_lookahead_uploads_the_custom_generate_file(monkeypatch, capsys):
    api = RecordingApi()
    monkeypatch.setattr("hf_linattn.hub_cards.push.HfApi", lambda token=None: api)
    assert main(["push-lookahead", "--repo-id", "me/lookahead"]) == 0
    (_, _, _), (kind, repo, kw) = api.calls
    assert (kind, repo, kw["path_in_repo"], kw["allow_patterns"]) == ("upload_folder", "me/lookahead",
                                                                      "custom_generate", ["generate.py"])  # fmt: skip
    from pathlib import Path

    source = Path(kw["folder_path"]) / "generate.py"
    assert "def generate(" in source.read_text() and "import hf_linattn" not in source.read_text()
    assert "custom_generate='me/lookahead'" in capsys.readouterr().out
