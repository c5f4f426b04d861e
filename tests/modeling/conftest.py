"""Fixtures for the modeling tests (helpers live in tiny.py; the ``stack`` fixture is in tests/conftest.py)."""
