"""A local lm-evaluation-harness task over the held-out text, so converted checkpoints run under ``lm_eval``.

    hf-linattn lm-eval-task tasks/
    .venv/bin/lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True \\
                      --include_path tasks/ --tasks hf_linattn_heldout --device cpu --batch_size 1

The task is a rolling log-likelihood (perplexity) task like wikitext: word perplexity, byte
perplexity and bits per byte over each document.

The folder is portable (no absolute path in it): lm_eval resolves ``!function`` references in a
task YAML against the YAML's own folder, so the YAML names a small task class written beside it
(``{TASK_NAME}_task.py``) that reads the JSONL documents next to its own file. A plain
``dataset_kwargs.data_files`` path would be resolved against the current directory instead.
"""

from __future__ import annotations

import json
from pathlib import Path

TASK_NAME = "hf_linattn_heldout"

_YAML = """task: {name}
class: !function {name}_task.HeldoutTask
dataset_path: json
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
should_decontaminate: false
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""

_TASK_CLASS = '''"""lm_eval task {name} (from hf-linattn lm-eval-task): its documents are the JSONL file beside it."""

from pathlib import Path

import datasets
from lm_eval.api.task import ConfigurableTask

DATA = Path(__file__).resolve().with_name("{name}.jsonl")


class HeldoutTask(ConfigurableTask):
    def __init__(self, config=None, **kwargs):
        # lm_eval passes the whole YAML, "class" key included, which TaskConfig does not take
        super().__init__(config={{k: v for k, v in (config or {{}}).items() if k != "class"}}, **kwargs)

    def download(self, dataset_kwargs=None, **kwargs):
        self.dataset = datasets.load_dataset("json", data_files={{"test": str(DATA)}})
'''


def write_lm_eval_task(
    folder: str | Path, texts: list[str] | None = None, max_docs: int = 16, max_chars: int = 2000
) -> Path:
    """Write ``{TASK_NAME}.yaml``, its task class and its JSONL documents into ``folder``; returns the YAML path.

    texts: documents (default: the embedded held-out files), each cut to ``max_chars`` characters at a line end.
    """
    from hf_linattn.assets import heldout_texts
    from hf_linattn.fileio import atomic_write_text

    folder = Path(folder)
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
    atomic_write_text(folder / f"{TASK_NAME}.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs))
    atomic_write_text(folder / f"{TASK_NAME}_task.py", _TASK_CLASS.format(name=TASK_NAME))
    path = folder / f"{TASK_NAME}.yaml"
    atomic_write_text(path, _YAML.format(name=TASK_NAME))
    return path
