"""Reading jobs back: wait, get_job, get_jobs and per-queue counts."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from psycopg.pq import Format

from conveyor import App, JobContext, JobNotFound, JobState, WaitTimeout, Worker, WorkerConfig
from conveyor.db.connect import _json_loads
from conveyor.testing import drain


async def test_wait_returns_the_job_once_it_is_terminal(app: App) -> None:
    @app.task(name="square")
    async def square(ctx: object, x: int) -> int:
        return x * x

    worker = Worker(app, WorkerConfig(poll_interval=timedelta(milliseconds=100)))
    await worker.start()
    try:
        job = await square.enqueue(x=7)
        done = await app.wait(job.id, timeout=10)
    finally:
        await worker.stop()
    assert done.state is JobState.SUCCEEDED
    assert done.is_finished
    assert done.result == 49


async def test_wait_returns_an_already_finished_job_at_once(app: App) -> None:
    @app.task(name="noop")
    async def noop(ctx: object) -> None: ...

    job = await noop.enqueue()
    await drain(app)
    done = await app.wait(job.id, timeout=timedelta(seconds=0))
    assert done.state is JobState.SUCCEEDED


async def test_wait_for_a_job_nobody_runs_raises_wait_timeout(app: App) -> None:
    @app.task(name="orphan")
    async def orphan(ctx: object) -> None: ...

    job = await orphan.enqueue()
    with pytest.raises(WaitTimeout, match="still available"):
        await app.wait(job.id, timeout=0.3)
    with pytest.raises(TimeoutError):
        await app.wait(job.id, timeout=timedelta(milliseconds=50))


async def test_wait_for_a_missing_job_raises_job_not_found(app: App) -> None:
    with pytest.raises(JobNotFound):
        await app.wait(123_456, timeout=1)


async def test_get_job_of_a_missing_id_raises_job_not_found(app: App) -> None:
    with pytest.raises(JobNotFound, match="job 987 does not exist") as caught:
        await app.get_job(987)
    assert caught.value.job_id == 987
    with pytest.raises(JobNotFound):
        app.get_job_sync(987)


async def test_get_jobs_returns_the_existing_ones_in_id_order(app: App) -> None:
    @app.task(name="noop")
    async def noop(ctx: object) -> None: ...

    first, second = await app.enqueue_many([noop.job(), noop.job()])
    jobs = await app.get_jobs([second.id, 999_999, first.id])
    assert [j.id for j in jobs] == [first.id, second.id]
    assert await app.get_jobs([]) == []


async def test_counts_match_what_was_enqueued_per_queue_and_state(app: App) -> None:
    @app.task(name="work")
    async def work(ctx: object, fail: bool = False) -> None:
        if fail:
            raise ValueError("asked to fail")

    assert await app.counts() == {}
    await app.enqueue_many([work.configure(queue="a").job() for _ in range(3)])
    await app.enqueue_many([work.configure(queue="b").job() for _ in range(2)])
    await work.configure(queue="b", delay=timedelta(hours=1)).enqueue()
    assert await app.counts() == {
        "a": {"available": 3},
        "b": {"available": 2, "scheduled": 1},
    }

    await work.configure(queue="a", max_attempts=1).enqueue(fail=True)
    await drain(app, WorkerConfig(queues=("a",), poll_interval=timedelta(milliseconds=50)))
    expected = {"a": {"succeeded": 3, "failed": 1}, "b": {"available": 2, "scheduled": 1}}
    assert await app.counts() == expected
    assert app.counts_sync() == expected


EMPTIES = "SELECT '{}'::jsonb AS a, '{}'::jsonb AS b, '[]'::jsonb AS c, '{\"x\": [1]}'::jsonb AS d"


async def test_both_pools_parse_empty_json_values_as_new_objects(app: App) -> None:
    # Every claim reads each job's meta and errors, mostly {} and []: the pools'
    # connections skip the JSON parser for those, and must still hand out a new
    # object each time (a task may change its job's meta).
    async with app.db.connection() as conn:
        row = await (await conn.execute(EMPTIES)).fetchone()
        assert _loads_of(conn) is _json_loads
    assert row == {"a": {}, "b": {}, "c": [], "d": {"x": [1]}}
    assert row["a"] is not row["b"]
    with app.db.sync_pool().connection() as sync_conn:
        sync_row = sync_conn.execute(EMPTIES).fetchone()
        assert _loads_of(sync_conn) is _json_loads
    assert sync_row == row

    @app.task(name="tagged")
    async def tagged(ctx: JobContext) -> None: ...

    job = await tagged.enqueue()
    read = await app.get_job(job.id)
    assert (read.meta, read.errors) == ({}, [])
    read.meta["mine"] = 1
    assert (await app.get_job(job.id)).meta == {}


def _loads_of(conn: Any) -> Any:
    oid = conn.adapters.types["jsonb"].oid
    loader = conn.adapters.get_loader(oid, Format.TEXT)
    return loader(oid, conn).loads
