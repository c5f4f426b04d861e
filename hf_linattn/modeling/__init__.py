"""transformers classes of hf_linattn (``hf_linattn.modeling``); also the remote code of checkpoints.

Importing this package registers the models with transformers' Auto classes. ``save_pretrained``
assembles the checkpoint's remote code into one flat folder (``export.py``): the files here and
the pure-torch op files of ``hf_linattn.kernels``, with their ``hf_linattn.<part>`` imports made
relative, so a checkpoint loads with ``trust_remote_code=True`` where hf_linattn is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache_linattn import LinAttnCache
from .configuration_linattn import LAYER_TYPES, LINEAR_LAYER_TYPES, SOFTMAX_LAYER_TYPES, LinAttnConfig
from .modeling_linattn import LinAttnForCausalLM, LinAttnModel, LinAttnPreTrainedModel
from .static_cache_linattn import LinAttnStaticCache

AutoConfig.register(LinAttnConfig.model_type, LinAttnConfig, exist_ok=True)
AutoModel.register(LinAttnConfig, LinAttnModel, exist_ok=True)
AutoModelForCausalLM.register(LinAttnConfig, LinAttnForCausalLM, exist_ok=True)
LinAttnConfig.register_for_auto_class()
LinAttnModel.register_for_auto_class("AutoModel")
LinAttnForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "LAYER_TYPES",
    "LINEAR_LAYER_TYPES",
    "SOFTMAX_LAYER_TYPES",
    "LinAttnCache",
    "LinAttnConfig",
    "LinAttnForCausalLM",
    "LinAttnModel",
    "LinAttnPreTrainedModel",
    "LinAttnStaticCache",
]
