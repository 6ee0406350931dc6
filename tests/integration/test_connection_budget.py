"""A worker needs a fixed, small number of connections whatever its concurrency."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import psycopg

from conveyor import App, JobContext, Worker, WorkerConfig


async def _backends(url: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def test_concurrency_50_uses_at_most_pool_plus_listener(app: App, database_url: str) -> None:
    release = asyncio.Event()
    started = 0

    @app.task(name="hold")
    async def hold(ctx: JobContext) -> None:
        nonlocal started
        started += 1
        await release.wait()

    await app.enqueue_many([hold.job() for _ in range(200)])
    worker = Worker(
        app,
        WorkerConfig(concurrency=50, heartbeat_interval=timedelta(milliseconds=100)),
    )
    await worker.start()
    peak = 0
    try:
        async with asyncio.timeout(30):
            while started < 50:
                peak = max(peak, await _backends(database_url))
                await asyncio.sleep(0.01)
        # Heartbeats, claims and enqueues run while 50 jobs hold their slots.
        for _ in range(20):
            await hold.enqueue()
            peak = max(peak, await _backends(database_url))
            await asyncio.sleep(0.02)
        release.set()
        async with asyncio.timeout(30):
            while worker.stats.succeeded < 220:
                peak = max(peak, await _backends(database_url))
                await asyncio.sleep(0.01)
    finally:
        release.set()
        await worker.stop()
    assert app.config.pool_size == 3
    assert 1 <= peak <= app.config.pool_size + 1
