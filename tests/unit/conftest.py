"""Unit tests use no services: they override the database fixtures to fail loudly."""

from __future__ import annotations

import pytest


def _no_database() -> None:
    pytest.fail("unit tests must not touch PostgreSQL: move this test to tests/integration")


@pytest.fixture
def server_url() -> str:
    """Overrides the session server so a unit test asking for it fails at once."""
    _no_database()
    raise AssertionError("unreachable")


@pytest.fixture
def database_url() -> str:
    """Overrides the per-test database so a unit test asking for it fails at once."""
    _no_database()
    raise AssertionError("unreachable")


@pytest.fixture
def app() -> None:
    """Overrides the App fixture so a unit test asking for it fails at once."""
    _no_database()
