"""Helpers for integration tests: read the test database directly, behind conveyor's back."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

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
