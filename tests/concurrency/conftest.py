"""Fixtures for the concurrency tests: the sample app, worker subprocesses."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor import App
from tests.concurrency.procs import StartWorker, WorkerProcess, query, start_worker
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
    started: list[WorkerProcess] = []

    def launch(name: str, **options: Any) -> WorkerProcess:
        proc = start_worker(database_url, tmp_path / "workers", name, **options)
        started.append(proc)
        return proc

    yield launch
    for proc in started:
        proc.kill()
        print(f"--- worker {proc.name} (pid {proc.pid}, exit {proc.popen.returncode}):")
        print(proc.log())
