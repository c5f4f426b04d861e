"""Model cards and Hub export for converted checkpoints (``hf_linattn.hub_cards``).

``render_model_card`` fills the card template from a conversion report (metadata through
huggingface_hub's ``ModelCardData``), and ``push_to_hub`` checks that a folder is a complete
trust_remote_code checkpoint before uploading it with ``HfApi.upload_folder``.
"""

from .card import render_model_card, write_model_card
from .push import IncompleteCheckpointError, check_exportable, push_custom_generate, push_to_hub

__all__ = [
    "IncompleteCheckpointError",
    "check_exportable",
    "push_custom_generate",
    "push_to_hub",
    "render_model_card",
    "write_model_card",
]
