"""Helpers for integration tests: read the test database directly, behind conveyor's back."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from conveyor import WorkerConfig

Rows = list[dict[str, Any]]
QueryDb = Callable[..., Awaitable[Rows]]
CountJobs = Callable[[], Awaitable[int]]


@pytest.fixture
def query_db(database_url: str) -> QueryDb:
    """`await query_db(sql, *params)`: run raw SQL on this test's database in autocommit."""

    async def run(query: str, *params: Any) -> Rows:
        async with await psycopg.AsyncConnection.connect(
            database_url, autocommit=True, row_factory=dict_row
        ) as conn:
            cur = await conn.execute(query, params or None)
            return await cur.fetchall() if cur.description else []

    return run


@pytest.fixture
def count_jobs(query_db: QueryDb) -> CountJobs:
    """`await count_jobs()`: rows in `conveyor.jobs`, whatever their state."""

    async def count() -> int:
        rows = await query_db("SELECT count(*) AS n FROM conveyor.jobs")
        return int(rows[0]["n"])

    return count


QUIET_WORKER = WorkerConfig(
    poll_interval=timedelta(milliseconds=50),
    lease_duration=timedelta(minutes=10),
    heartbeat_interval=timedelta(minutes=5),
    dead_after=timedelta(minutes=20),
    run_rescuer=False,
)
"""A worker whose heartbeat and rescuer cannot fire while a test briefly swaps a
job's lease token (`lease_taken_away`)."""


@asynccontextmanager
async def lease_taken_away(query_db: QueryDb, job_id: int) -> AsyncIterator[None]:
    """Inside the block, job `job_id` carries another lease token, as if the rescuer
    had given it to another worker: the running attempt is a zombie. Restored after."""
    (row,) = await query_db(
        "UPDATE conveyor.jobs SET lease_token = lease_token + 1000000 WHERE id = %s "
        "RETURNING lease_token - 1000000 AS original",
        job_id,
    )
    try:
        yield
    finally:
        await query_db(
            "UPDATE conveyor.jobs SET lease_token = %s WHERE id = %s", row["original"], job_id
        )
