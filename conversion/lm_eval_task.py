"""A local lm-evaluation-harness task over the held-out text, so converted checkpoints run under ``lm_eval``.

    hf-linattn lm-eval-task tasks/
    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True \\
            --include_path tasks/ --tasks hf_linattn_heldout --device cpu --batch_size 1

The task is a rolling log-likelihood (perplexity) task like wikitext: word perplexity, byte
perplexity and bits per byte over each document.
"""

from __future__ import annotations

import json
from pathlib import Path

TASK_NAME = "hf_linattn_heldout"

_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
should_decontaminate: false
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def write_lm_eval_task(
    folder: str | Path, texts: list[str] | None = None, max_docs: int = 16, max_chars: int = 2000
) -> Path:
    """Write ``{TASK_NAME}.yaml`` and its JSONL documents into ``folder``; returns the YAML path.

    texts: documents (default: the embedded held-out files), each cut to ``max_chars`` characters at a line end.
    """
    from hf_linattn.assets import heldout_texts

    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    docs = []
    for text in (texts if texts is not None else heldout_texts())[:max_docs]:
        cut = text[:max_chars]
        if len(text) > max_chars and "\n" in cut:
            cut = cut[: cut.rindex("\n") + 1]
        if cut.strip():
            docs.append(cut)
    if not docs:
        raise ValueError("no non-empty documents for the lm-eval task")
    data = folder / f"{TASK_NAME}.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    path = folder / f"{TASK_NAME}.yaml"
    path.write_text(_YAML.format(name=TASK_NAME, data=json.dumps(str(data))), encoding="utf-8")
    return path
