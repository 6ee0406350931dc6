"""Cancelling tasks that use the pool never loses one of its connections.

psycopg_pool alone leaks a connection when its borrower is cancelled while
being handed one, or while giving one back; a worker cancels tasks all the
time, and each leak shrank its pool for good until every statement timed out
(found as a step run twice after a `PoolTimeout` in a real-process test).
`conveyor.db.shielding` makes the borrow and the return safe; these tests
cancel at random moments, with a fixed seed, many times over.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import timedelta

from conveyor import App, JobContext, Worker, WorkerConfig
from conveyor.config import Config
from tests.conftest import SCHEMA

POOL = 3
ROUNDS = 150
TASKS_PER_ROUND = 4
STATEMENTS_PER_TASK = 5


def _pool_app(database_url: str) -> App:
    return App(config=Config(database_url=database_url, schema=SCHEMA, pool_size=POOL))


async def _assert_pool_whole(app: App) -> None:
    """All POOL connections can be held at once, and each one works."""
    async with AsyncExitStack() as stack:
        held = [await stack.enter_async_context(app.db.connection()) for _ in range(POOL)]
        for conn in held:
            await conn.execute("SELECT 1")
    stats = (await app.db.pool()).get_stats()
    assert stats["pool_available"] == stats["pool_size"] == POOL, stats


async def _race_cancellations(
    app: App, seed: int, statements: Callable[[random.Random], Awaitable[None]]
) -> None:
    """ROUNDS rounds of TASKS_PER_ROUND tasks running `statements`, half of them
    cancelled at a random moment; then the pool must be whole."""
    rng = random.Random(seed)
    try:
        for _ in range(ROUNDS):
            work = [asyncio.create_task(statements(rng)) for _ in range(TASKS_PER_ROUND)]
            await asyncio.sleep(rng.random() * 0.01)
            for task in rng.sample(work, len(work) // 2):
                task.cancel()
            await asyncio.gather(*work, return_exceptions=True)
        await _assert_pool_whole(app)
    finally:
        await app.close()


async def test_tasks_cancelled_mid_borrow_mid_statement_or_mid_return_leave_the_pool_whole(
    database_url: str,
) -> None:
    app = _pool_app(database_url)

    async def borrower(rng: random.Random) -> None:
        for _ in range(STATEMENTS_PER_TASK):
            async with app.db.connection() as conn:
                await conn.execute("SELECT pg_sleep(%s)", [rng.random() * 0.004])

    await _race_cancellations(app, 20261125, borrower)


async def test_callers_cancelled_during_fetch_leave_the_pool_whole(database_url: str) -> None:
    app = _pool_app(database_url)

    async def fetcher(rng: random.Random) -> None:
        for _ in range(STATEMENTS_PER_TASK):
            await app.db.fetch("read the clock", "clock_now")

    await _race_cancellations(app, 7, fetcher)


async def test_a_worker_whose_jobs_are_cancelled_mid_statement_keeps_its_whole_pool(
    database_url: str,
) -> None:
    cancels = 60
    app = _pool_app(database_url)
    started = asyncio.Queue[int]()

    @app.task(name="pool.busy")
    async def busy(ctx: JobContext) -> None:
        await started.put(ctx.job.id)
        while True:  # statements until cancelled, as a task writing run state does
            async with ctx.app.db.connection() as conn:
                await conn.execute("SELECT pg_sleep(0.001)")
            await ctx.app.db.fetch("read the clock", "clock_now")

    worker = Worker(
        app,
        WorkerConfig(concurrency=4, poll_interval=timedelta(milliseconds=50)),
    )
    try:
        jobs = await app.enqueue_many(busy.job() for _ in range(cancels))
        await worker.start()
        for _ in range(cancels):
            job_id = await asyncio.wait_for(started.get(), 30)
            await app.cancel(job_id)
        for job in jobs:
            assert (await app.wait(job.id, timeout=30)).state == "cancelled"
        await worker.stop()
        assert worker.stats.cancelled == cancels
        await _assert_pool_whole(app)
    finally:
        await worker.stop()
        await app.close()
