"""hf_linattn: residual linear attention (gla / gdn / rla / rdn) for the Hugging Face ecosystem.

The public names load lazily (PEP 562), so ``import hf_linattn`` and the CLI's ``--help`` do not
pay for torch and transformers. The first use of a model class (or ``import hf_linattn.modeling``)
registers the models with transformers' Auto classes and marks them for
``register_for_auto_class``, so ``save_pretrained`` writes ``auto_map`` and self-contained remote
code that loads with ``trust_remote_code=True`` where hf_linattn is not installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hf_linattn._lazy import lazy_attributes

__version__ = "0.1.0"

# public name -> the subpackage that defines it
_LAZY = {
    "LinAttnCache": "hf_linattn.modeling",
    "LinAttnConfig": "hf_linattn.modeling",
    "LinAttnForCausalLM": "hf_linattn.modeling",
    "LinAttnModel": "hf_linattn.modeling",
    "residual_attention": "hf_linattn.kernels",
}

if TYPE_CHECKING:
    from hf_linattn.kernels import residual_attention
    from hf_linattn.modeling import LinAttnCache, LinAttnConfig, LinAttnForCausalLM, LinAttnModel


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

__all__ = [
    "LinAttnCache",
    "LinAttnConfig",
    "LinAttnForCausalLM",
    "LinAttnModel",
    "residual_attention",
]
