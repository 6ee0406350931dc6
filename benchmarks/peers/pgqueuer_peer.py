"""PgQueuer (https://pgqueuer.readthedocs.io) behind the peer contract.

Idiomatic async setup: one `PgQueuer` over one asyncpg connection (`AsyncpgDriver`,
pgqueuer's default driver; its worker uses that single connection for dequeue,
LISTEN, log and heartbeat writes), `pgq.run(batch_size=B, max_concurrent_tasks=C)`
in this process, jobs enqueued with `Queries.enqueue` (scalars for one job, lists
for a batch: one UNNEST insert). Settings and reasons: README.md.

PEERS_PGQUEUER_DRIVER=psycopg switches to `PsycopgDriver` (one autocommit psycopg
connection), the driver conveyor and procrastinate use; it is 2-4x slower here.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import version
from typing import Any

import psycopg
from benchmarks.peers.common import (
    all_finished,
    analyze,
    db_seconds,
    enqueue_result,
    latency_result,
    paced,
    throughput_result,
    wait_db_count,
    wait_until,
)
from pgqueuer import PgQueuer, Queries
from pgqueuer.db import AsyncpgDriver, PsycopgDriver
from pgqueuer.models import Job
from psycopg.conninfo import conninfo_to_dict

NAME = "pgqueuer"
VERSION = version("pgqueuer")

ENTRYPOINT = "bench_noop"
LATENCY_CONCURRENCY = 10
WARMUP = -1
DRIVER = os.environ.get("PEERS_PGQUEUER_DRIVER", "asyncpg")
if DRIVER == "asyncpg":
    # Not installed: ImportError on import, and the harness leaves pgqueuer out.
    import asyncpg  # type: ignore[import-untyped]


def batch_size(concurrency: int) -> int:
    """The dequeue batch for a worker capped at `concurrency` jobs: the largest that
    `run()` accepts (it requires max_concurrent_tasks >= 2 * batch_size). Measured here
    at concurrency 50: batch 25 > 10 (the default) > 5 > 2, so larger is better."""
    if concurrency < 2:
        raise ValueError("pgqueuer needs max_concurrent_tasks >= 2 * batch_size >= 2")
    return concurrency // 2


def asyncpg_kwargs(database_url: str) -> dict[str, Any]:
    """asyncpg.connect() arguments for a libpq URL *or* key=value conninfo (the harness
    passes the latter, which asyncpg cannot parse). Unknown parameters raise rather than
    being dropped silently."""
    params: dict[str, Any] = conninfo_to_dict(database_url)
    kwargs: dict[str, Any] = {
        "host": params.pop("host", None),
        "port": int(params.pop("port")) if "port" in params else None,
        "user": params.pop("user", None),
        "password": params.pop("password", None),
        "database": params.pop("dbname", None),
    }
    if "connect_timeout" in params:
        kwargs["timeout"] = float(params.pop("connect_timeout"))
    if "sslmode" in params:
        kwargs["ssl"] = params.pop("sslmode")
    if "application_name" in params:
        kwargs["server_settings"] = {"application_name": params.pop("application_name")}
    if params:
        raise ValueError(f"connection parameters not passed on to asyncpg: {sorted(params)}")
    return {key: value for key, value in kwargs.items() if value is not None}


@asynccontextmanager
async def _queries(database_url: str) -> AsyncIterator[Queries]:
    """`Queries` over one fresh connection of the chosen driver, closed on exit."""
    if DRIVER == "asyncpg":
        conn = await asyncpg.connect(**asyncpg_kwargs(database_url))
        try:
            yield Queries(AsyncpgDriver(conn))
        finally:
            await conn.close()
    else:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            yield Queries(PsycopgDriver(conn))


def _succeeded(queries: Queries) -> str:
    log = queries.qbe.settings.queue_table_log
    return f"SELECT count(*) FROM {log} WHERE entrypoint = '{ENTRYPOINT}' AND status = 'successful'"


def _span(queries: Queries) -> str:
    """First pick to last success on the database clock ('picked' and 'successful' log rows)."""
    log = queries.qbe.settings.queue_table_log
    return (
        "SELECT extract(epoch FROM max(created) FILTER (WHERE status = 'successful')"
        " - min(created) FILTER (WHERE status = 'picked'))"
        f" FROM {log} WHERE entrypoint = '{ENTRYPOINT}'"
    )


async def _enqueue_many(queries: Queries, payloads: list[bytes]) -> None:
    await queries.enqueue([ENTRYPOINT] * len(payloads), list(payloads), [0] * len(payloads))


class _Worker:
    """One PgQueuer worker running as a task of this event loop."""

    def __init__(self, queries: Queries, concurrency: int, on_job: Callable[[int], None]) -> None:
        self.pgq = PgQueuer(queries.driver)
        self.concurrency = concurrency

        @self.pgq.entrypoint(ENTRYPOINT)
        async def noop(job: Job) -> None:
            on_job(int(job.payload or b"0"))

        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(
            self.pgq.run(
                batch_size=batch_size(self.concurrency),
                max_concurrent_tasks=self.concurrency,
            )
        )

    def done(self) -> bool:
        return self.task is not None and self.task.done()

    async def stop(self) -> None:
        """Graceful: shutdown event, in-flight jobs finish, log buffers flush."""
        self.pgq.shutdown.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 60)


async def setup(database_url: str) -> None:
    """Install PgQueuer's schema (what `pgq install` does)."""
    async with _queries(database_url) as queries:
        await queries.install()


async def enqueue(database_url: str, *, single: int, bulk: int) -> dict[str, float]:
    """`single` Queries.enqueue calls with one job each over one connection, then one
    Queries.enqueue of `bulk` jobs (lists: one UNNEST insert)."""
    async with _queries(database_url) as queries:
        timings: list[float] = []
        for index in range(single):
            started = time.perf_counter()
            await queries.enqueue(ENTRYPOINT, str(index).encode())
            timings.append(time.perf_counter() - started)
        payloads = [str(index).encode() for index in range(bulk)]
        started = time.perf_counter()
        if bulk:
            await _enqueue_many(queries, payloads)
        bulk_s = time.perf_counter() - started
    return enqueue_result(single, timings, bulk, bulk_s)


async def throughput(database_url: str, *, jobs: int, concurrency: int) -> dict[str, float]:
    """`jobs` queued no-op jobs through one in-process worker; wall time from worker start
    until the database logs all of them successful."""
    ran = 0
    first_start: list[float] = []

    def on_job(index: int) -> None:
        nonlocal ran
        if not first_start:
            first_start.append(time.perf_counter())
        ran += 1

    async with _queries(database_url) as client:
        await _enqueue_many(client, [str(index).encode() for index in range(jobs)])
        succeeded, span = _succeeded(client), _span(client)
        queue_table = client.qbe.settings.queue_table
    await analyze(database_url, queue_table)
    async with _queries(database_url) as queries:
        worker = _Worker(queries, concurrency, on_job)
        started = time.perf_counter()
        worker.start()
        try:
            seconds = await all_finished(
                database_url,
                peer=NAME,
                jobs=jobs,
                ran=lambda: ran,
                stopped=worker.done,
                succeeded=succeeded,
                started=started,
            )
        finally:
            await worker.stop()
    span_s = await db_seconds(database_url, span)
    return throughput_result(jobs, seconds, first_start[0] - started, span_s)


async def latency(database_url: str, *, jobs: int, rate_per_s: float) -> dict[str, float]:
    """An idle worker (concurrency 10, LISTEN/NOTIFY); `jobs` single enqueues at
    `rate_per_s` from a separate connection; enqueue -> start per job."""
    enqueued_at: dict[int, float] = {}
    started_at: dict[int, float] = {}

    def on_job(index: int) -> None:
        started_at[index] = time.time()

    async with _queries(database_url) as queries, _queries(database_url) as client:
        succeeded = _succeeded(client)
        worker = _Worker(queries, LATENCY_CONCURRENCY, on_job)
        worker.start()
        try:
            # Ready = one job round-tripped (the worker LISTENs before its first
            # dequeue); start-up is not latency.
            await client.enqueue(ENTRYPOINT, str(WARMUP).encode())
            await wait_until(lambda: WARMUP in started_at or worker.done(), what="warm-up job")

            async def one(index: int) -> None:
                enqueued_at[index] = time.time()
                await client.enqueue(ENTRYPOINT, str(index).encode())

            await paced(jobs, rate_per_s, one)
            await wait_until(lambda: len(started_at) > jobs or worker.done(), what="jobs")
            if worker.done():
                raise RuntimeError("pgqueuer worker stopped early")
            await wait_db_count(database_url, succeeded, jobs + 1)
        finally:
            await worker.stop()
    return latency_result([started_at[i] - enqueued_at[i] for i in range(jobs)])
