"""Export and push against a real Hub-compatible server (olah on 127.0.0.1, serving a local git repo offline).

A tiny real conversion of the embedded teacher is exported with ``hf-linattn export`` (weights sharded), committed
into a git repo that olah serves, and loaded in a fresh process where hf_linattn cannot be imported, with
``HF_ENDPOINT`` pointing at the server: tokenizer, model at a pinned commit, greedy tokens equal to the local
model's, lookahead through ``custom_generate=repo_id``, sampling (the repo's custom_generate/ does not replace
generate()), and the card through ``ModelCard.load``. olah accepts no uploads, so ``push`` is tested up to the
upload: no token, a repo with other content, the failed upload itself, and ``--dry-run``.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.clitools import HF_LINATTN, assert_one_line_error, snapshot
from tests.conversion.conftest import convert_cli

from .hub_server import OLAH, OlahServer, commit_folder

pytestmark = pytest.mark.skipif(
    not OLAH.exists(), reason=f"no olah server at {OLAH} (.ci/run installs it: python3 -m venv .venv-olah && "
    ".venv-olah/bin/pip install olah==0.5.4)",
)  # fmt: skip
REPO_ID = "me/tiny-rdn"
ALLOWED_IMPORTS = {"torch", "transformers", "triton", "__future__"} | set(sys.stdlib_module_names)


def _cli(*args: str | Path, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env = {**base, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([str(HF_LINATTN), *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env=env)  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """(converted folder, its export with 4 MB shards and a decode benchmark) of a tiny real conversion."""
    root = tmp_path_factory.mktemp("export")
    convert_cli(root / "converted", "--keep-softmax", "2")
    result = _cli("export", root / "converted", root / "repo", "--repo-id", REPO_ID, "--max-shard-size", "4MB",
                  "--bench", "--no-progress", cwd=root, env={"HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""
    shards = list((root / "repo").glob("*.safetensors"))
    assert len(shards) > 1  # 4 MB shards of a larger model
    assert f"{len(shards)} safetensors file(s)" in result.stdout
    return root / "converted", root / "repo"


@pytest.fixture(scope="module")
def server(tmp_path_factory, exported):
    """olah serving the export as ``REPO_ID`` (one commit) and a foreign repo ``me/foreign``; yields (server, sha)."""
    root = tmp_path_factory.mktemp("olah")
    olah = OlahServer(root)
    try:
        shutil.copytree(exported[1], olah.repo(REPO_ID))
        sha = commit_folder(olah.repo(REPO_ID), "export")
        foreign = olah.repo("me/foreign")
        foreign.mkdir(parents=True)
        (foreign / "README.md").write_text("---\nlicense: mit\ntags:\n- vision\n---\n# someone's model\n")
        (foreign / "weights.bin").write_bytes(b"not ours")
        commit_folder(foreign)
        yield olah, sha
    finally:
        olah.stop()


def test_export_is_a_complete_repo(exported):
    _, repo = exported
    names = {p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()}
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) >= 3 and "model.safetensors.index.json" in names  # 13 MB of fp16 weights, 4 MB shards
    index = json.loads((repo / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert all((repo / s).stat().st_size <= 4_000_000 for s in shards)
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
            "custom_generate/generate.py", "conversion_report.json", "decode_benchmark.json", "modeling_linattn.py",
            "triton_ops.py", "triton_block.py", "layer_errors.png"} <= names  # fmt: skip
    assert json.loads((repo / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].startswith("modeling_")
    assert not any(n.startswith((".conversion", "lora_adapter")) for n in names)  # the training state stays local
    assert (repo / "layer_errors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for path in repo.rglob("*.py"):  # the remote code imports torch, transformers, stdlib and triton only
        tree = ast.parse(path.read_text())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert roots <= ALLOWED_IMPORTS, (path.name, roots - ALLOWED_IMPORTS)
    bench = json.loads((repo / "decode_benchmark.json").read_text())
    assert [r["context"] for r in bench["rows"]] == [256, 1024] and bench["teacher"] == "embedded-teacher"
    for row in bench["rows"]:  # 6 of 8 layers keep a fixed-size state: the cache is smaller than the teacher's
        assert row["student_tokens_per_s"] > 0 and 0 < row["student_cache_bytes"] < row["teacher_cache_bytes"]
    card = (repo / "README.md").read_text()
    assert f"{bench['rows'][1]['student_tokens_per_s']}" in card and "![Per-layer stage-1 error" in card


# Runs with HF_ENDPOINT at the server and hf_linattn not importable.
LOAD_FROM_SERVER = textwrap.dedent(
    """
    import sys
    sys.modules["hf_linattn"] = None
    import torch
    from huggingface_hub import ModelCard
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    repo_id, sha, io_file = sys.argv[1:4]
    tokenizer = AutoTokenizer.from_pretrained(repo_id, revision=sha)
    model = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True, revision=sha).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert "generate" not in vars(model), "the repo's custom_generate/ replaced generate()"
    ids = tokenizer("def read_config(path):\\n    with open(", return_tensors="pt").input_ids
    kw = dict(max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        greedy = model.generate(ids, **kw)
        lookahead = model.generate(ids, custom_generate=repo_id, trust_remote_code=True, lookahead_window=4, **kw)
        sampled = model.generate(ids, do_sample=True, max_new_tokens=5, pad_token_id=0)
    assert sampled.shape[1] == ids.shape[1] + 5
    save_file({"ids": ids, "greedy": greedy, "lookahead": lookahead}, io_file)
    card = ModelCard.load(repo_id)
    print("CARD", card.data.license, len(card.data.eval_results), card.data.base_model)
    """
)


def test_repo_loads_from_the_server_without_the_package(server, exported, tmp_path):
    from hf_linattn.modeling import LinAttnForCausalLM

    olah, sha = server
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "PYTHONPATH"}
    env |= {"HF_ENDPOINT": olah.endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}  # fmt: skip
    io_file = tmp_path / "io.safetensors"
    result = subprocess.run([sys.executable, "-c", LOAD_FROM_SERVER, REPO_ID, sha, str(io_file)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:] + olah.log.read_text()[-2000:]
    assert "CARD apache-2.0 3 None" in result.stdout  # license of the embedded teacher, 3 metrics, no Hub base
    # everything came from the server (a fresh HF_HOME), at the pinned commit
    snapshots = list((tmp_path / "hf" / "hub").glob(f"models--me--tiny-rdn/snapshots/{sha}"))
    assert snapshots and len(list(snapshots[0].glob("model-*.safetensors"))) >= 3
    remote = load_file(io_file)
    local = LinAttnForCausalLM.from_pretrained(exported[1]).eval()
    with torch.no_grad():
        greedy = local.generate(remote["ids"], max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(remote["greedy"], greedy)
    assert torch.equal(remote["lookahead"], greedy)  # lookahead is exact greedy


def _push_env(olah: OlahServer, tmp_path: Path, token: str | None = "hf_fake") -> dict:
    return {"HF_ENDPOINT": olah.endpoint, "HF_HOME": str(tmp_path / "hf"), **({"HF_TOKEN": token} if token else {})}


def test_push_refuses_a_repo_with_other_content(server, exported, tmp_path):
    olah, _ = server
    converted = exported[0]
    before = snapshot(converted)
    result = _cli("push", converted, "--repo-id", "me/foreign", "--no-progress", cwd=tmp_path,
                  env=_push_env(olah, tmp_path))  # fmt: skip
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "me/foreign exists with other content", "weights.bin", "--force",
                          "nothing was uploaded")  # fmt: skip
    assert snapshot(converted) == before


def test_failed_upload_says_what_was_not_uploaded(server, exported, tmp_path):
    """Our own repo passes the content check; the server refuses the upload (olah is read-only): one line, exit 1."""
    olah, _ = server
    converted = exported[0]
    before = snapshot(converted)
    result = _cli("push", converted, "--repo-id", REPO_ID, "--max-shard-size", "4MB", "--no-progress", cwd=tmp_path,
                  env=_push_env(olah, tmp_path))  # fmt: skip
    assert result.returncode == 1
    line = assert_one_line_error(result.stderr, f"uploading to {REPO_ID} failed", "no commit was made",
                                 f"is on {REPO_ID}@main", "nothing local changed")  # fmt: skip
    n_files = len([p for p in exported[1].rglob("*") if p.is_file() and p.name != "decode_benchmark.json"])
    assert f"none of the {n_files} files" in line
    assert snapshot(converted) == before
    # and with no token anywhere: refused before anything is read or exported
    result = _cli("push", converted, "--repo-id", REPO_ID, cwd=tmp_path, env=_push_env(olah, tmp_path, token=None))
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "no Hub token", "HF_TOKEN", "nothing was uploaded")


def test_dry_run_prints_the_plan_offline(exported, tmp_path):
    converted, repo = exported
    before = snapshot(converted)
    result = _cli("push", converted, "--repo-id", REPO_ID, "--revision", "v1", "--max-shard-size", "4MB",
                  "--dry-run", "--no-progress", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    files = {p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()} - {"decode_benchmark.json"}
    assert lines[0].startswith(f"dry run: {len(files)} files") and lines[0].endswith(f"{REPO_ID}@v1")
    listed = {line.split()[-1] for line in lines[1:]}
    assert listed == files and "custom_generate/generate.py" in listed
    sizes = {line.split()[-1]: line.split()[:2] for line in lines[1:]}
    assert sizes["model.safetensors.index.json"][1] == "KB"
    assert snapshot(converted) == before


def test_export_refuses_a_nonempty_output_and_a_foreign_folder(exported, tmp_path):
    converted, _ = exported
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    result = _cli("export", converted, tmp_path / "out", "--no-progress", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "exists and is not empty", "--overwrite")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "llama" / "tokenizer_config.json").write_text("{}")
    save_file({"w": torch.zeros(1)}, tmp_path / "llama" / "model.safetensors")
    (tmp_path / "llama" / "README.md").write_text("card")
    result = _cli("export", tmp_path / "llama", tmp_path / "out2", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "model_type 'llama' is not an hf_linattn checkpoint")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out2.partial").exists()
