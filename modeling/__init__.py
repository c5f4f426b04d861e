"""transformers classes of hf_linattn (``hf_linattn.modeling``); also the remote code of checkpoints.

``save_pretrained`` copies ``modeling_linattn.py`` and, following its same-folder relative imports,
every other file here into the checkpoint, so a checkpoint loads with ``trust_remote_code=True``
where hf_linattn is not installed. The pure-torch op files (``ops.py``, ``modes.py``,
``recurrent.py``, ``chunked.py``) are symlinks to ``kernels/``: one source, importable from both
places, and copied into checkpoints as real files.
"""

from .cache_linattn import LinAttnCache
from .configuration_linattn import LAYER_TYPES, LINEAR_LAYER_TYPES, SOFTMAX_LAYER_TYPES, LinAttnConfig
from .modeling_linattn import LinAttnForCausalLM, LinAttnModel, LinAttnPreTrainedModel

__all__ = [
    "LAYER_TYPES",
    "LINEAR_LAYER_TYPES",
    "SOFTMAX_LAYER_TYPES",
    "LinAttnCache",
    "LinAttnConfig",
    "LinAttnForCausalLM",
    "LinAttnModel",
    "LinAttnPreTrainedModel",
]
