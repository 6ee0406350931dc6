"""Fixtures for the concurrency tests: the sample app, worker subprocesses."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from conveyor import App
from tests.concurrency.procs import StartWorker, query, worker_launcher
from tests.concurrency.sample_app import EXECUTIONS_DDL, build_app


@pytest.fixture
async def sample_app(database_url: str) -> AsyncIterator[App]:
    """The sample tasks' App on this test's database, with the `executions` side table."""
    app = build_app(database_url)
    await query(app, EXECUTIONS_DDL)
    yield app
    await app.close()


@pytest.fixture
def start(database_url: str, tmp_path: Path) -> Iterator[StartWorker]:
    """Start worker subprocesses; any still running at teardown is killed, and every
    worker's log is printed (pytest shows it when the test failed)."""
    with worker_launcher(database_url, tmp_path / "workers") as launch:
        yield launch
