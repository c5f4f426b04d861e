"""A local lm-evaluation-harness task over the held-out text, so converted checkpoints run under ``lm_eval``.

    hf-linattn lm-eval-task tasks/
    .venv/bin/lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --include_path tasks/ \\
                      --tasks hf_linattn_heldout,hf_linattn_heldout_lines --device cpu --batch_size 1

``hf_linattn_heldout`` is a rolling log-likelihood (perplexity) task like wikitext: word perplexity, byte
perplexity and bits per byte over each document. ``hf_linattn_heldout_lines`` (same folder, pass
both with ``--tasks a,b``) is a ``generate_until`` task: greedy completion of held-out code lines
until a newline, scored by exact match (prompts from ``generation_eval.completion_prompts``, the
ones ``hf-linattn eval`` scores).

The folder is portable (no absolute path in it): lm_eval resolves ``!function`` references in a
task YAML against the YAML's own folder, so the YAML names a small task class written beside it
(``{TASK_NAME}_task.py``) that reads the JSONL documents next to its own file. A plain
``dataset_kwargs.data_files`` path would be resolved against the current directory instead.
"""

from __future__ import annotations

import json
from pathlib import Path

TASK_NAME = "hf_linattn_heldout"
GENERATION_TASK_NAME = "hf_linattn_heldout_lines"

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

# doc_to_text / doc_to_target name JSONL fields (no Jinja template, which could touch whitespace)
_GENERATION_YAML = """task: {name}
class: !function {name}_task.HeldoutTask
dataset_path: json
test_split: test
output_type: generate_until
doc_to_text: context
doc_to_target: target
should_decontaminate: false
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_new_tokens}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  prompts: {prompts}
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
    folder: str | Path,
    texts: list[str] | None = None,
    max_docs: int = 16,
    max_chars: int = 2000,
    completion_prompts: int | None = None,
) -> Path:
    """Write both tasks (YAML, task class, JSONL documents) into ``folder``; returns the perplexity task's YAML path.

    texts: documents (default: the embedded held-out files); perplexity documents are cut to
    ``max_chars`` characters at a line end. completion_prompts: lines of the generation task
    (default ``generation_eval.COMPLETION_PROMPTS``).
    """
    from hf_linattn.assets import heldout_texts
    from hf_linattn.fileio import atomic_write_text

    from .generation_eval import COMPLETION_PROMPTS, MAX_NEW_TOKENS
    from .generation_eval import completion_prompts as select_prompts

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    docs = []
    texts = texts if texts is not None else heldout_texts()
    lines = select_prompts(texts, completion_prompts or COMPLETION_PROMPTS)
    for text in texts[:max_docs]:
        cut = text[:max_chars]
        if len(text) > max_chars and "\n" in cut:
            cut = cut[: cut.rindex("\n") + 1]
        if cut.strip():
            docs.append(cut)
    if not docs:
        raise ValueError("no non-empty documents for the lm-eval task")
    atomic_write_text(folder / f"{TASK_NAME}.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs))
    atomic_write_text(folder / f"{TASK_NAME}_task.py", _TASK_CLASS.format(name=TASK_NAME))
    name = GENERATION_TASK_NAME
    atomic_write_text(folder / f"{name}.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    atomic_write_text(folder / f"{name}_task.py", _TASK_CLASS.format(name=name))
    yaml = _GENERATION_YAML.format(name=name, max_new_tokens=MAX_NEW_TOKENS, prompts=len(lines))
    atomic_write_text(folder / f"{name}.yaml", yaml)
    path = folder / f"{TASK_NAME}.yaml"
    atomic_write_text(path, _YAML.format(name=TASK_NAME))
    return path
