"""The four modes of the residual linear-attention family and their two switches: the one source of the mode list.

Every backend reads these tables instead of comparing mode strings, so a new mode is one
line here. Plain Python without torch, so that the CLI can list the modes without loading
torch; copied into checkpoints as remote code (``hf_linattn.modeling.export``).
"""

from __future__ import annotations

# mode -> (delta rule writes the error e instead of v, residual state R exists)
MODE_TABLE: dict[str, tuple[bool, bool]] = {
    "gla": (False, False),
    "gdn": (True, False),
    "rla": (False, True),
    "rdn": (True, True),
}
MODES: tuple[str, ...] = tuple(MODE_TABLE)


def is_delta(mode: str) -> bool:
    """True when the base state is updated by the delta rule (gdn, rdn)."""
    return MODE_TABLE[mode][0]


def is_residual(mode: str) -> bool:
    """True when the mode keeps the clipped residual state R (rla, rdn)."""
    return MODE_TABLE[mode][1]
