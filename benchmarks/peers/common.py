"""What the peer adapters share: percentiles, pacing, and waiting on the database."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable

import psycopg
from psycopg import sql

POLL_S = 0.01
"""How often a waiting scenario samples progress (in process first, then the database)."""

DONE_TIMEOUT_S = 600.0
"""A scenario that has not finished by then raises instead of hanging the harness."""

ANALYZE = os.environ.get("PEERS_ANALYZE", "1") != "0"
"""ANALYZE the peer's job table after the untimed bulk enqueue of `throughput` (README)."""


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile, the same rule as conveyor's own scenarios."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def enqueue_result(single: int, timings: list[float], bulk: int, bulk_s: float) -> dict[str, float]:
    """The `enqueue` scenario's dict from per-call timings (s) and the bulk call's time (s)."""
    return {
        "single_jobs_per_s": round(single / sum(timings)) if timings else 0.0,
        "single_p50_ms": round(percentile(timings, 0.5) * 1000, 3) if timings else 0.0,
        "single_p99_ms": round(percentile(timings, 0.99) * 1000, 3) if timings else 0.0,
        "bulk_jobs_per_s": round(bulk / bulk_s) if bulk else 0.0,
    }


def latency_result(delays_s: list[float]) -> dict[str, float]:
    """The `latency` scenario's dict from enqueue -> start delays (s)."""
    ms = [d * 1000 for d in delays_s]
    return {
        "p50_ms": round(percentile(ms, 0.5), 3),
        "p99_ms": round(percentile(ms, 0.99), 3),
        "max_ms": round(max(ms), 3),
    }


async def db_count(url: str, query: str) -> int:
    """One `SELECT count(*) ...` on its own short-lived connection."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(query)
        row = await cur.fetchone()
    return int(row[0]) if row else 0


def throughput_result(
    jobs: int, seconds: float, startup_s: float, span_s: float | None
) -> dict[str, float]:
    """The `throughput` scenario's dict.

    `jobs_per_s`/`seconds`: wall clock from worker start until the database shows every
    job finished (the contract). `span_*`: the database's own clock from the first job
    start to the last finish, from the peer's timestamps, which is how conveyor's
    `conveyor bench` measures (worker start-up and the final poll excluded).
    """
    result = {
        "jobs_per_s": round(jobs / seconds),
        "seconds": round(seconds, 3),
        "startup_s": round(startup_s, 3),
    }
    if span_s:
        result |= {"span_jobs_per_s": round(jobs / span_s), "span_seconds": round(span_s, 3)}
    return result


async def analyze(url: str, table: str) -> None:
    """Give the planner statistics for a table just bulk-filled in a fresh database, as
    autovacuum would in a running system (skipped with PEERS_ANALYZE=0)."""
    if not ANALYZE:
        return
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(*table.split("."))))


async def db_seconds(url: str, query: str) -> float | None:
    """One query that returns a number of seconds (or NULL)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(query)
        row = await cur.fetchone()
    return float(row[0]) if row and row[0] is not None else None


async def wait_until(
    predicate: Callable[[], bool], *, what: str, timeout: float = DONE_TIMEOUT_S
) -> None:
    """Sample an in-process condition every POLL_S; raise TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(POLL_S)


async def all_finished(
    url: str,
    *,
    peer: str,
    jobs: int,
    ran: Callable[[], int],
    stopped: Callable[[], bool],
    succeeded: str,
    started: float,
) -> float:
    """Wait until the worker ran `jobs` (counted in process) and the database shows
    them all finished (`succeeded`, a count query); seconds since `started`."""
    await wait_until(lambda: ran() >= jobs or stopped(), what="jobs to run")
    if stopped():
        raise RuntimeError(f"{peer} worker stopped early ({ran()} of {jobs} ran)")
    await wait_db_count(url, succeeded, jobs)
    return time.perf_counter() - started


async def wait_db_count(
    url: str, query: str, expected: int, *, timeout: float = DONE_TIMEOUT_S
) -> None:
    """Poll `query` (a count) on one connection until it reaches `expected`.

    Called only once the in-process counter says every job ran, so the polling
    adds no load while the worker is busy; what it waits for is the peer's own
    completion write (procrastinate's status update, pgqueuer's buffered log
    flush) reaching the database.
    """
    deadline = time.monotonic() + timeout
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while True:
            cur = await conn.execute(query)
            row = await cur.fetchone()
            count = int(row[0]) if row else 0
            if count >= expected:
                if count > expected:
                    raise AssertionError(f"{count} jobs finished, expected {expected}")
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} of {expected} jobs finished in the database")
            await asyncio.sleep(POLL_S)


async def paced(
    jobs: int, rate_per_s: float, enqueue_one: Callable[[int], Awaitable[None]]
) -> None:
    """Call `enqueue_one(i)` for i in range(jobs) at `rate_per_s`, on an absolute schedule
    (a slow call does not push every later one back)."""
    interval = 1 / rate_per_s
    next_at = time.perf_counter()
    for index in range(jobs):
        await enqueue_one(index)
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))


async def stop_task(task: asyncio.Task[object], *, timeout: float = 60.0) -> None:
    """Cancel a worker task and wait for it; re-raise anything but the cancellation."""
    if task.done():
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout)


async def until_listening(url: str, stopped: Callable[[], bool], *, timeout: float = 30.0) -> None:
    """Wait until some other session of this database has issued LISTEN as its latest
    statement (a worker's dedicated notification connection), or raise."""
    query = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND query ~* '^\\s*(--[^\\n]*\\n\\s*)*LISTEN\\s'"
    )
    deadline = time.monotonic() + timeout
    while await db_count(url, query) < 1:
        if stopped():
            raise RuntimeError("the worker stopped before it listened")
        if time.monotonic() > deadline:
            raise TimeoutError("no LISTEN connection appeared")
        await asyncio.sleep(0.02)
