"""Model card rendering and the Hub push's calls (recorded here; test_hub_server.py runs against a real server)."""

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

    def model_info(self, repo_id, **kwargs):
        from huggingface_hub.errors import RepositoryNotFoundError

        self.calls.append(("model_info", repo_id, kwargs))
        err = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # (its __init__ wants an HTTP response)
        Exception.__init__(err, "no such repo")
        raise err

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

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
    assert meta["base_model_relation"] == "finetune" and "license" not in meta  # unknown license: not invented
    text = str(card)
    assert 'repo, revision = "me/qwen3-rdn", "COMMIT_SHA"' in text and "revision=revision" in text
    assert "| perplexity | 12.346 | 13.500 (1.093x) |" in text and "| - | 62.5% (mean agreeing prefix 7.5" in text
    assert "| 2 | full_attention | 0.9000 |" in text and "| 3 | rdn | 0.3000 |" in text
    assert "highest error keep softmax" in text and "+ MLP" in text
    assert "| line exact match (64 held-out code lines) | 14.1% | 9.4% (same as the teacher on 42.2%) |" in text
    assert "custom_generate=repo" in text and "assistant_model=assistant" in text and "arxiv.org/abs/2509.25223" in text
    assert "Not measured for this export" in text and "was not evaluated for this model" in text
    assert "github.com" not in text  # no invented project URL
    # a report from before the line-completion metric still renders, without its row
    old = render_model_card({k: v for k, v in REPORT.items() if k != "line_completion"})
    assert "line exact match" not in str(old) and "| perplexity |" in str(old)


@pytest.mark.parametrize(("selection", "says"), [("even", "evenly\nspaced"), ("kl", "chosen by KL to the teacher")])
def test_card_says_how_the_softmax_layers_were_chosen(selection, says):
    recipe = {**REPORT["recipe"], "softmax_selection": selection, "train_mixers": True}
    text = str(render_model_card({**REPORT, "recipe": recipe}))
    assert says in text and f"--softmax-selection {selection}" in text and "highest error keep" not in text
    assert "the linear layers' new pieces trained in full" in text
    assert "trained in full" not in str(render_model_card(REPORT))


def test_card_round_trips_through_model_card_load(tmp_path):
    """ModelCard.load parses the card; model-index gives back the same EvalResults, and the metadata is what we set."""
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    from hf_linattn.hub_cards.card import eval_results

    decode = {"device": "cpu (x86_64)", "dtype": "float32", "threads": 1, "new_tokens": 32,
              "rows": [{"context": 256, "student_tokens_per_s": 80.5, "teacher_tokens_per_s": 70.25,
                        "student_cache_bytes": 3 * 2**20, "teacher_cache_bytes": 9 * 2**20}]}  # fmt: skip
    passkey = {"passkey": {"accuracy": {"512": 0.5}, "teacher_accuracy": {"512": 1.0}}}
    card = render_model_card(REPORT, "me/qwen3-rdn", decode=decode, eval_report=passkey, plot="layer_errors.png",
                             license="apache-2.0", license_source="the card of Qwen/Qwen3-0.6B")  # fmt: skip
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.to_dict() == card.data.to_dict()
    assert loaded.data.license == "apache-2.0" and loaded.data.base_model == "Qwen/Qwen3-0.6B"
    assert loaded.data.library_name == "transformers" and loaded.data.pipeline_tag == "text-generation"
    name, results = model_index_to_eval_results(loaded.data.to_dict()["model-index"])
    assert name == "qwen3-rdn" and results == eval_results(REPORT) == loaded.data.eval_results
    assert [(r.metric_type, r.metric_value) for r in results] == [("perplexity", 13.5), ("accuracy", 0.625),
                                                                  ("exact_match", 0.0938)]  # fmt: skip
    text = loaded.text
    assert "| 256 | 70.25 | 80.5 | 9.00 MiB | 3.00 MiB |" in text and "![Per-layer stage-1 error" in text
    assert "| passkey retrieval at 512 tokens | 100% | 50% |" in text and "the passkey rows above" in text


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


def test_push_uploads_the_export_without_training_state(exported):
    (exported / "README.md").write_text("card")
    api = RecordingApi()
    url = push_to_hub(exported, "me/tiny", private=True, revision="v1", commit_message="first", api=api)
    assert url.endswith("/commit/abc")
    assert [c[0] for c in api.calls] == ["model_info", "create_repo", "create_branch", "upload_folder"]
    _, (_, repo0, kw0), (_, _, branch), (_, _, kw1) = api.calls
    assert (branch["branch"], branch["exist_ok"]) == ("v1", True)
    assert (repo0, kw0["private"], kw0["exist_ok"]) == ("me/tiny", True, True)
    assert (kw1["revision"], kw1["commit_message"], kw1["delete_patterns"]) == ("v1", "first", None)
    assert kw1["folder_path"] != str(exported) and not Path(kw1["folder_path"]).exists()  # a staging export, removed
    assert not any(name.startswith((".conversion", "lora_adapter")) for name in api.uploaded)
    assert {"model.safetensors", "config.json", "modeling_linattn.py", "tokenizer.json", "generation_config.json",
            "custom_generate/generate.py", "conversion_report.json"} <= set(api.uploaded)  # fmt: skip
    assert b'"me/tiny", "COMMIT_SHA"' in api.uploaded["README.md"]
    assert (exported / "README.md").read_bytes() == api.uploaded["README.md"]  # the pushed card, now local too


def test_cli_push_rerenders_the_card_for_the_repo(exported, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    api = RecordingApi()
    monkeypatch.setattr("hf_linattn.hub_cards.push.HfApi", lambda token=None: api)
    assert main(["push", str(exported), "--repo-id", "me/tiny"]) == 0
    assert '"me/tiny", "COMMIT_SHA"' in (exported / "README.md").read_text()
    assert [c[0] for c in api.calls] == ["model_info", "create_repo", "upload_folder"]


def test_report_name_matches_the_conversion():
    from hf_linattn.conversion.output import REPORT_NAME
    from hf_linattn.hub_cards.push import REPORT_NAME as PUSHED_REPORT_NAME

    assert PUSHED_REPORT_NAME == REPORT_NAME


def test_failed_upload_changes_nothing_local(exported, monkeypatch, capsys):
    (exported / "README.md").write_text("the user's own card")
    before = snapshot(exported)
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    api = RecordingApi(fail_upload=True)
    monkeypatch.setattr("hf_linattn.hub_cards.push.HfApi", lambda token=None: api)
    assert main(["push", str(exported), "--repo-id", "me/tiny"]) == 1
    assert b'"me/tiny"' in api.uploaded["README.md"]  # the card was rendered, in the staging copy only
    assert snapshot(exported) == before
    assert_one_line_error(capsys.readouterr().err, "uploading to me/tiny failed", "no commit was made",
                          "the repo me/tiny was created, empty", "nothing local changed")  # fmt: skip


def test_push_cli_offline_is_one_line_and_leaves_every_byte(exported, tmp_path):
    """Through the installed command, with the Hub unreachable (offline mode): one line, exit 1, files untouched."""
    (exported / "README.md").write_text("the user's own card")
    before = snapshot(exported)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_fake"}
    result = subprocess.run([sys.executable, "-m", "hf_linattn.cli", "push", str(exported), "--repo-id", "me/tiny"],
                            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert_one_line_error(result.stderr, "reading me/tiny failed", "nothing was uploaded")
    assert snapshot(exported) == before


def test_incomplete_folder_is_not_pushed(exported):
    with pytest.raises(IncompleteCheckpointError, match=r"README\.md"):
        check_exportable(exported)  # no card yet
    (exported / "README.md").write_text("card")
    code = check_exportable(exported)
    assert "modeling_linattn.py" in code and "configuration_linattn.py" in code
    (exported / "modeling_linattn.py").unlink()
    with pytest.raises(IncompleteCheckpointError, match=r"modeling_linattn\.py"):
        check_exportable(exported)
    (exported / "tokenizer_config.json").unlink()
    api = RecordingApi()
    with pytest.raises(IncompleteCheckpointError, match=r"tokenizer_config\.json"):
        push_to_hub(exported, "me/tiny", api=api)
    assert api.calls == []  # refused before any Hub call


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
