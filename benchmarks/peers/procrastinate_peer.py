"""procrastinate (https://procrastinate.readthedocs.io) behind the peer contract.

Idiomatic async setup: `App(connector=PsycopgConnector(...))`, `App.open_async()`,
`run_worker_async(concurrency=C, listen_notify=True)` in this process, tasks
deferred with `defer_async` (single) and `batch_defer_async` (bulk, one
`procrastinate_defer_jobs_v1` call). Settings and reasons: README.md.
"""

from __future__ import annotations

import asyncio
import time
from importlib.metadata import version
from typing import Any

from benchmarks.peers.common import (
    all_finished,
    analyze,
    db_seconds,
    enqueue_result,
    latency_result,
    paced,
    stop_task,
    throughput_result,
    until_listening,
    wait_db_count,
    wait_until,
)
from procrastinate import App, PsycopgConnector
from procrastinate.types import JSONDict

NAME = "procrastinate"
VERSION = version("procrastinate")

TASK = "bench.noop"
LATENCY_CONCURRENCY = 10
WARMUP = -1
WORKER_POOL = 4
"""The worker's pool: psycopg_pool's default size, which PsycopgConnector() gets when not
told otherwise, and the best measured here (at concurrency 50: 4 >= 8 > 16 > 53). The
LISTEN connection is a separate one, outside the pool."""
SUCCEEDED = (
    f"SELECT count(*) FROM procrastinate_jobs WHERE task_name = '{TASK}' AND status = 'succeeded'"
)
SPAN = (
    "SELECT extract(epoch FROM max(e.at) FILTER (WHERE e.type = 'succeeded')"
    " - min(e.at) FILTER (WHERE e.type = 'started'))"
    " FROM procrastinate_events e JOIN procrastinate_jobs j ON j.id = e.job_id"
    f" WHERE j.task_name = '{TASK}'"
)


def _app(database_url: str, *, pool: int) -> App:
    """An App whose pool holds exactly `pool` connections (psycopg_pool's default is 4)."""
    # kwargs={}: procrastinate 3.2 unpacks pool.kwargs for its LISTEN connection, and
    # psycopg_pool 3.3 leaves them None unless given.
    connector = PsycopgConnector(conninfo=database_url, kwargs={}, min_size=pool, max_size=pool)
    return App(connector=connector)


def _worker_options(concurrency: int) -> dict[str, Any]:
    return {
        "concurrency": concurrency,
        "listen_notify": True,
        "wait": True,
        "install_signal_handlers": False,
        "name": "bench",
    }


async def setup(database_url: str) -> None:
    """Install procrastinate's schema (what `procrastinate schema --apply` does)."""
    app = _app(database_url, pool=1)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


async def enqueue(database_url: str, *, single: int, bulk: int) -> dict[str, float]:
    """`single` defer_async calls one after another over one pooled connection, then one
    batch_defer_async of `bulk` jobs."""
    app = _app(database_url, pool=1)

    @app.task(name=TASK)
    async def noop(i: int) -> None:
        return None

    async with app.open_async():
        timings: list[float] = []
        for index in range(single):
            started = time.perf_counter()
            await noop.defer_async(i=index)
            timings.append(time.perf_counter() - started)
        kwargs: list[JSONDict] = [{"i": index} for index in range(bulk)]
        started = time.perf_counter()
        if bulk:
            await noop.batch_defer_async(*kwargs)
        bulk_s = time.perf_counter() - started
    return enqueue_result(single, timings, bulk, bulk_s)


async def throughput(database_url: str, *, jobs: int, concurrency: int) -> dict[str, float]:
    """`jobs` queued no-op jobs through one in-process worker; wall time from worker start
    until the database shows all of them succeeded."""
    app = _app(database_url, pool=WORKER_POOL)
    ran = 0
    first_start: list[float] = []

    @app.task(name=TASK)
    async def noop(i: int) -> None:
        nonlocal ran
        if not first_start:
            first_start.append(time.perf_counter())
        ran += 1

    async with app.open_async():
        queued: list[JSONDict] = [{"i": index} for index in range(jobs)]
        await noop.batch_defer_async(*queued)
        await analyze(database_url, "procrastinate_jobs")
        started = time.perf_counter()
        worker = asyncio.create_task(app.run_worker_async(**_worker_options(concurrency)))
        try:
            seconds = await all_finished(
                database_url,
                peer=NAME,
                jobs=jobs,
                ran=lambda: ran,
                stopped=worker.done,
                succeeded=SUCCEEDED,
                started=started,
            )
        finally:
            await stop_task(worker)
    span_s = await db_seconds(database_url, SPAN)
    return throughput_result(jobs, seconds, first_start[0] - started, span_s)


async def latency(database_url: str, *, jobs: int, rate_per_s: float) -> dict[str, float]:
    """An idle worker (concurrency 10, LISTEN/NOTIFY); `jobs` defer_async calls at
    `rate_per_s` from a separate one-connection app; enqueue -> start per job."""
    worker_app = _app(database_url, pool=WORKER_POOL)
    client_app = _app(database_url, pool=1)
    enqueued_at: dict[int, float] = {}
    started_at: dict[int, float] = {}

    @worker_app.task(name=TASK)
    async def noop(i: int) -> None:
        started_at[i] = time.time()

    client = client_app.configure_task(name=TASK)

    async with worker_app.open_async(), client_app.open_async():
        worker = asyncio.create_task(
            worker_app.run_worker_async(**_worker_options(LATENCY_CONCURRENCY))
        )
        try:
            # Ready = LISTEN issued and one job round-tripped; start-up is not latency.
            await until_listening(database_url, worker.done)
            await client.defer_async(i=WARMUP)
            await wait_until(lambda: WARMUP in started_at or worker.done(), what="warm-up job")

            async def one(index: int) -> None:
                enqueued_at[index] = time.time()
                await client.defer_async(i=index)

            await paced(jobs, rate_per_s, one)
            await wait_until(lambda: len(started_at) > jobs or worker.done(), what="jobs")
            if worker.done():
                raise RuntimeError("procrastinate worker stopped early")
            await wait_db_count(database_url, SUCCEEDED, jobs + 1)
        finally:
            await stop_task(worker)
    return latency_result([started_at[i] - enqueued_at[i] for i in range(jobs)])
