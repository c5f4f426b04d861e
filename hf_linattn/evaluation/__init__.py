"""Benchmarks of the models themselves (``hf_linattn.evaluation``): MQAR recall (``mqar.py``).

Imported by ``hf-linattn bench``; each module loads torch, so the CLI imports them only when a benchmark runs.
"""
