"""Model cards and Hub export for converted checkpoints (``hf_linattn.hub_cards``).

``export_repo`` writes a converted checkpoint as a complete Hub model repo (weights, remote code, tokenizer,
``custom_generate/``, the card rendered by ``render_model_card``); ``push_to_hub`` exports into a staging
folder and uploads it with ``HfApi``.
"""

from .card import render_model_card, write_model_card
from .export import IncompleteCheckpointError, export_repo, file_plan
from .push import check_exportable, push_custom_generate, push_to_hub

__all__ = [
    "IncompleteCheckpointError",
    "check_exportable",
    "export_repo",
    "file_plan",
    "push_custom_generate",
    "push_to_hub",
    "render_model_card",
    "write_model_card",
]
