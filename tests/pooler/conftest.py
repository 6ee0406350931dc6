"""A real PgBouncer in transaction mode in front of the test server.

Started once per session on a free port with few server connections per
database, so that clients really share server sessions between their
transactions, as they do in production. The `pgbouncer` binary comes from the
system (`.ci/run` installs Debian's package), or is the one CONVEYOR_PGBOUNCER
names (say a 1.21+ built from source); it is not on PyPI. Without it these
tests skip, except where CONVEYOR_TEST_REQUIRE_PGBOUNCER is set (CI).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor import App, Config
from conveyor.bench.pgbouncer import PgBouncer, pgbouncer_binary, running_pgbouncer
from tests.concurrency.procs import StartWorker, worker_launcher

REQUIRE_ENV = "CONVEYOR_TEST_REQUIRE_PGBOUNCER"
"""Set (CI sets it): a missing binary fails these tests instead of skipping them."""
SERVER_SESSIONS = 6
"""Server connections PgBouncer opens per database: fewer than its clients."""


@pytest.fixture(scope="session")
def pgbouncer(server_url: str) -> Iterator[PgBouncer]:
    """The running PgBouncer."""
    if pgbouncer_binary() is None:
        missing = "pgbouncer is not installed (Debian: apt-get install pgbouncer)"
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{missing}, and {REQUIRE_ENV} is set")
        pytest.skip(missing)
    with running_pgbouncer(server_url, pool_size=SERVER_SESSIONS) as bouncer:
        yield bouncer


@pytest.fixture
def pooled_url(pgbouncer: PgBouncer, database_url: str) -> str:
    """This test's database, reached through PgBouncer."""
    return pgbouncer.url(database_url)


def pooled_config(url: str, **overrides: Any) -> Config:
    """What an App behind PgBouncer < 1.21 in transaction mode needs: no server-side
    prepared statements (1.21+ keeps them with `max_prepared_statements`)."""
    return Config(database_url=url, prepare_threshold=None, **overrides)


@pytest.fixture
async def pooled_app(pooled_url: str) -> Any:
    """An App, with no tasks, whose every connection goes through PgBouncer."""
    app = App(config=pooled_config(pooled_url))
    yield app
    await app.close()


@pytest.fixture
def start_pooled(pooled_url: str, tmp_path: Path) -> Iterator[StartWorker]:
    """Start sample worker processes that reach the database through PgBouncer only."""
    with worker_launcher(pooled_url, tmp_path / "workers", pooled=True) as launch:
        yield launch
