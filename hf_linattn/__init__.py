"""hf_linattn: residual linear attention (gla / gdn / rla / rdn) for the Hugging Face ecosystem.

Importing it registers the models with transformers' Auto classes and marks them for
``register_for_auto_class``, so ``save_pretrained`` writes ``auto_map`` and self-contained
remote code that loads with ``trust_remote_code=True`` where hf_linattn is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .kernels import residual_attention
from .modeling import LinAttnCache, LinAttnConfig, LinAttnForCausalLM, LinAttnModel

__version__ = "0.1.0"

AutoConfig.register(LinAttnConfig.model_type, LinAttnConfig, exist_ok=True)
AutoModel.register(LinAttnConfig, LinAttnModel, exist_ok=True)
AutoModelForCausalLM.register(LinAttnConfig, LinAttnForCausalLM, exist_ok=True)
LinAttnConfig.register_for_auto_class()
LinAttnModel.register_for_auto_class("AutoModel")
LinAttnForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "LinAttnCache",
    "LinAttnConfig",
    "LinAttnForCausalLM",
    "LinAttnModel",
    "residual_attention",
]
