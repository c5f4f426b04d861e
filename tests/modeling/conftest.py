"""Fixtures for the modeling tests (helpers live in tiny.py)."""

from __future__ import annotations

import pytest

from .tiny import STACKS


@pytest.fixture(params=list(STACKS), ids=list(STACKS))
def stack(request) -> tuple[str, list[str]]:
    """(name, layer_types) of every pure mode and a hybrid."""
    return request.param, STACKS[request.param]
