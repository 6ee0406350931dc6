"""Enqueueing inside the caller's transaction: the job exists if and only if it commits."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import psycopg
import pytest

from conveyor import App, InvalidJobOptions, JobNotFound, JobState, Task, Worker, WorkerConfig
from tests.integration.conftest import CountJobs, QueryDb

LISTENER_READY_TIMEOUT_S = 10.0


def register_ping(app: App) -> Task:
    @app.task(name="ping")
    async def ping(ctx: object, n: int = 0) -> int:
        return n

    return ping


async def test_async_enqueue_in_a_rolled_back_transaction_leaves_no_job(
    app: App, database_url: str, count_jobs: CountJobs
) -> None:
    ping = register_ping(app)
    async with (
        await psycopg.AsyncConnection.connect(database_url) as conn,
        conn.transaction(force_rollback=True),
    ):
        job = await ping.configure(connection=conn).enqueue(n=1)
        assert job.state is JobState.AVAILABLE
    with pytest.raises(JobNotFound):
        await app.get_job(job.id)
    assert await count_jobs() == 0


async def test_async_enqueue_in_a_committed_transaction_is_visible(
    app: App, database_url: str
) -> None:
    ping = register_ping(app)
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        async with conn.transaction():
            job = await ping.configure(connection=conn).enqueue(n=1)
            # Invisible to everyone else until the commit.
            with pytest.raises(JobNotFound):
                await app.get_job(job.id)
        assert await app.get_job(job.id) == job


async def test_enqueue_through_the_app_and_in_batches_follows_the_transaction(
    app: App, database_url: str, count_jobs: CountJobs
) -> None:
    ping = register_ping(app)
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        async with conn.transaction(force_rollback=True):
            await app.enqueue(ping, {"n": 1}, connection=conn)
            await app.enqueue_many([ping.job(n=2), ping.job(n=3)], connection=conn)
        assert await count_jobs() == 0
        async with conn.transaction():
            await app.enqueue("ping", {"n": 1}, connection=conn)
            await app.enqueue_many([ping.job(n=2), ping.job(n=3)], connection=conn)
    assert await count_jobs() == 3


async def test_enqueue_joins_the_callers_own_writes_atomically(
    app: App, database_url: str, query_db: QueryDb
) -> None:
    ping = register_ping(app)
    await query_db("CREATE TABLE orders (id int PRIMARY KEY)")
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        with pytest.raises(psycopg.errors.UniqueViolation):
            async with conn.transaction():
                await ping.configure(connection=conn).enqueue(n=1)
                await conn.execute("INSERT INTO orders VALUES (1), (1)")
    assert await app.counts() == {}


async def test_sync_enqueue_in_a_rolled_back_transaction_leaves_no_job(
    app: App, database_url: str, count_jobs: CountJobs
) -> None:
    ping = register_ping(app)
    with psycopg.connect(database_url) as conn:
        with conn.transaction(force_rollback=True):
            job = ping.configure(connection=conn).enqueue_sync(n=1)
        with pytest.raises(JobNotFound):
            app.get_job_sync(job.id)
    assert await count_jobs() == 0


async def test_sync_enqueue_in_a_committed_transaction_is_visible(
    app: App, database_url: str
) -> None:
    ping = register_ping(app)
    with psycopg.connect(database_url) as conn:
        with conn.transaction():
            job = ping.configure(connection=conn).enqueue_sync(n=1)
            many = app.enqueue_many_sync([ping.job(n=2)], connection=conn)
            other = app.enqueue_sync(ping, {"n": 3}, connection=conn)
        assert app.get_job_sync(job.id) == job
    assert [j.id for j in await app.get_jobs([job.id, many[0].id, other.id])] == [
        job.id,
        many[0].id,
        other.id,
    ]


async def test_enqueue_with_the_wrong_kind_of_connection_is_refused(
    app: App, database_url: str, count_jobs: CountJobs
) -> None:
    ping = register_ping(app)
    with (
        psycopg.connect(database_url) as sync_conn,
        pytest.raises(InvalidJobOptions, match="enqueue_sync"),
    ):
        await ping.configure(connection=sync_conn).enqueue()
    async with await psycopg.AsyncConnection.connect(database_url) as async_conn:
        with pytest.raises(InvalidJobOptions, match="enqueue\\(\\)"):
            ping.configure(connection=async_conn).enqueue_sync()
    assert await count_jobs() == 0


async def _wait_for_listener(worker: Worker) -> None:
    """Until the worker's control session has LISTENed and its first claim has run.

    After that, with a 30 s poll, only a NOTIFY can make it claim again.
    """
    async with asyncio.timeout(LISTENER_READY_TIMEOUT_S):
        await worker.connected.wait()
        while worker.claims < 1:
            await asyncio.sleep(0.01)


async def test_listening_worker_starts_a_transactional_job_only_after_commit(
    app: App, database_url: str, query_db: QueryDb
) -> None:
    ping = register_ping(app)
    # A 30 s poll: within this test only a NOTIFY (sent at commit) can wake the worker.
    worker = Worker(app, WorkerConfig(poll_interval=timedelta(seconds=30), concurrency=1))
    await worker.start()
    try:
        await _wait_for_listener(worker)
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            async with conn.transaction():
                job = await ping.configure(connection=conn).enqueue(n=5)
                cur = await conn.execute(
                    "SELECT state::text FROM conveyor.jobs WHERE id = %s", [job.id]
                )
                assert await cur.fetchone() == ("available",)
                assert worker.running_job_ids == []
            done = await app.wait(job.id, timeout=10)
    finally:
        await worker.stop()
    assert done.state is JobState.SUCCEEDED
    assert done.result == 5
    assert worker.stats.succeeded == 1


async def test_listening_worker_in_another_schema_is_woken_on_its_own_channel(
    database_url: str, query_db: QueryDb
) -> None:
    async with App(database_url, schema="other") as other:
        await other.migrate()
        ping = register_ping(other)
        worker = Worker(other, WorkerConfig(poll_interval=timedelta(seconds=30)))
        await worker.start()
        try:
            await _wait_for_listener(worker)
            job = await ping.enqueue(n=9)
            done = await other.wait(job.id, timeout=10)
        finally:
            await worker.stop()
    assert done.state is JobState.SUCCEEDED
    assert done.result == 9
