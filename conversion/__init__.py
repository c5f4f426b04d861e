"""Linearizing Llama / Qwen checkpoints (``hf_linattn.conversion``): arrives with the conversion issue."""
