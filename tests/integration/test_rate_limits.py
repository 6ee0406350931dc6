"""Rate limits: at most N starts per period per key, across all workers (fake clock)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from conveyor import App, ConfigError, JobContext, RateLimit, Task, Worker, WorkerConfig
from conveyor.testing import advance_time, drain, freeze_time

START = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
FAST = WorkerConfig(poll_interval=timedelta(milliseconds=50), concurrency=5)


def _limited(app: App, **options: object) -> Task:
    @app.task(name="limited", rate_limit=RateLimit(3, timedelta(minutes=1)), **options)  # type: ignore[call-overload]
    async def limited(ctx: JobContext, n: int) -> int:
        return n

    return limited


async def _succeeded(app: App) -> int:
    return sum(by.get("succeeded", 0) for by in (await app.counts()).values())


async def test_at_most_n_start_per_window_and_the_next_window_opens_on_time(app: App) -> None:
    limited = _limited(app)
    await freeze_time(app, START)
    await app.enqueue_many([limited.job(n=i) for i in range(10)])
    await drain(app, FAST)
    assert await _succeeded(app) == 3
    await advance_time(app, timedelta(seconds=59))
    await drain(app, FAST)
    assert await _succeeded(app) == 3
    await advance_time(app, timedelta(seconds=1))
    await drain(app, FAST)
    assert await _succeeded(app) == 6
    (key,) = await app.keys()
    assert (key.rate_limit, key.rate_period_s, key.rate_window_count) == (3, 60.0, 3)
    assert key.rate_window_start == START + timedelta(minutes=1)


async def test_the_rate_is_global_across_workers(app: App, database_url: str) -> None:
    limited = _limited(app)
    await freeze_time(app, START)
    await app.enqueue_many([limited.job(n=i) for i in range(20)])
    others = [App(database_url, schema="conveyor") for _ in range(3)]
    workers = []
    for other in others:
        other.tasks = app.tasks
        workers.append(Worker(other, FAST))
    try:
        await asyncio.gather(*(w.start() for w in workers))
        for window in range(1, 4):

            async def started(expected: int = 3 * window) -> bool:
                return await _succeeded(app) >= expected

            async with asyncio.timeout(10):
                while not await started():
                    await asyncio.sleep(0.02)
            await asyncio.gather(*(w.wait_until_idle() for w in workers))
            assert await _succeeded(app) == 3 * window
            await advance_time(app, timedelta(minutes=1))
    finally:
        await asyncio.gather(*(w.stop() for w in workers))
        for other in others:
            await other.close()
    assert sum(w.stats.started for w in workers) == await _succeeded(app)


async def test_rate_and_concurrency_limit_combine(app: App) -> None:
    limited = _limited(app, concurrency_limit=1)
    await freeze_time(app, START)
    await app.enqueue_many([limited.job(n=i) for i in range(5)])
    jobs = await drain(app, FAST)
    assert sum(j.state == "succeeded" for j in jobs) == 3
    (key,) = await app.keys()
    assert (key.concurrency_limit, key.running, key.waiting) == (1, 0, 2)


@pytest.mark.parametrize(("count", "per"), [(0, timedelta(seconds=1)), (1, timedelta(0))])
def test_bad_rate_limits_are_config_errors(count: int, per: timedelta) -> None:
    with pytest.raises(ConfigError, match="RateLimit"):
        RateLimit(count, per)
