"""The worker registry, remote stop (NOTIFY and heartbeat), and a lease lost while running."""

from __future__ import annotations

import asyncio
import os
import socket
from datetime import UTC, datetime, timedelta
from typing import Any

import conveyor
from conveyor import App, JobContext, JobState, Worker, WorkerConfig
from conveyor.jobs import WorkerInfo
from conveyor.migrations.migrator import latest_version
from conveyor.testing import advance_time, freeze_time
from tests.integration.conftest import QueryDb
from tests.waiting import wait_for_state, wait_until

FROZEN = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)
WAIT_S = 10.0
QUIET = WorkerConfig(
    concurrency=2,
    poll_interval=timedelta(milliseconds=50),
    # Beats only when a test asks.
    heartbeat_interval=timedelta(seconds=30),
    lease_duration=timedelta(seconds=60),
    run_rescuer=False,
)


async def wait_running(app: App, job_id: int) -> None:
    await wait_for_state(app, job_id, "running")


async def row_of(app: App, worker_id: str) -> WorkerInfo:
    (row,) = [w for w in await app.workers() if w.id == worker_id]
    return row


async def start_running(worker: Worker) -> asyncio.Task[None]:
    """`worker.run()` as a task, once the worker is registered and connected."""
    task = asyncio.create_task(worker.run())
    connected = asyncio.create_task(worker.connected.wait())
    done, _ = await asyncio.wait(
        {task, connected}, timeout=WAIT_S, return_when=asyncio.FIRST_COMPLETED
    )
    connected.cancel()
    if task in done:
        task.result()  # raises why it ended
    assert connected in done, "worker did not connect"
    return task


async def test_registry_row_follows_the_worker_lifecycle(app: App) -> None:
    release = asyncio.Event()

    @app.task(name="held")
    async def held(ctx: JobContext) -> str:
        await release.wait()
        return "done"

    await freeze_time(app, FROZEN)
    config = WorkerConfig(
        queues=("default", "emails"),
        concurrency=3,
        poll_interval=timedelta(milliseconds=50),
        heartbeat_interval=timedelta(seconds=30),
        lease_duration=timedelta(seconds=60),
        run_rescuer=False,
        extra={"team": "payments"},
    )
    worker = Worker(app, config)
    await worker.start()
    try:
        row = await row_of(app, worker.id)
        assert row.host == socket.gethostname()
        assert row.pid == os.getpid()
        assert row.version == conveyor.__version__
        assert row.schema_version == latest_version()
        assert row.queues == ["default", "emails"]
        assert row.concurrency == 3
        assert row.state == "running"
        assert (row.started_at, row.heartbeat_at) == (FROZEN, FROZEN)
        assert (row.stopped_at, row.stop_requested_at) == (None, None)
        assert (row.running_jobs, row.leaked_slots) == (0, 0)
        assert row.stats["labels"] == {"team": "payments"}
        assert [w.id for w in await app.workers(live_only=True)] == [worker.id]

        job = await held.enqueue()
        await wait_running(app, job.id)
        beat_at = await advance_time(app, timedelta(seconds=7))
        reply = await worker.heartbeat_now()
        assert reply.renewed == {job.id}
        assert reply.registered
        assert not reply.stop_requested
        row = await row_of(app, worker.id)
        assert row.heartbeat_at == beat_at
        assert row.started_at == FROZEN
        assert row.running_jobs == 1
        assert row.stats["started"] == 1
        assert row.heartbeat_age_s == 0

        release.set()
        assert (await app.wait(job.id, timeout=WAIT_S)).state is JobState.SUCCEEDED
        await worker.wait_until_idle()
    finally:
        release.set()
        stop_at = await advance_time(app, timedelta(seconds=3))
        await worker.stop()

    row = await row_of(app, worker.id)
    assert row.state == "stopped"
    assert row.stopped_at == stop_at
    assert row.running_jobs == 0
    assert row.stats["succeeded"] == 1
    assert await app.workers(live_only=True) == []


async def test_remote_stop_by_notify_lets_the_running_job_finish(app: App) -> None:
    release = asyncio.Event()

    @app.task(name="finishing")
    async def finishing(ctx: JobContext) -> str:
        await release.wait()
        return "finished"

    worker = Worker(app, QUIET)
    run = await start_running(worker)
    try:
        job = await finishing.enqueue()
        await wait_running(app, job.id)

        assert await app.stop_workers(worker.id) == [worker.id]

        async def stopping() -> bool:
            return (await row_of(app, worker.id)).state == "stopping"

        # No heartbeat for 30 s: only the NOTIFY can have told it.
        await wait_until(stopping, "the worker to start stopping")
        assert not run.done()
        release.set()  # the running job finishes within the grace period
        await asyncio.wait_for(run, WAIT_S)
    finally:
        release.set()
        await worker.stop()
        if not run.done():
            run.cancel()

    done = await app.get_job(job.id)
    assert (done.state, done.result) == ("succeeded", "finished")
    row = await row_of(app, worker.id)
    assert row.state == "stopped"
    assert row.stop_requested_at is not None
    assert row.stopped_at is not None
    assert (worker.stats.succeeded, worker.stats.returned) == (1, 0)


async def test_remote_stop_by_heartbeat_only_returns_the_unfinished_job(app: App) -> None:
    seen: list[Any] = []

    @app.task(name="endless")
    async def endless(ctx: JobContext) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append(ctx.stop_reason)
            raise

    config = WorkerConfig(
        concurrency=1,
        poll_interval=timedelta(milliseconds=50),
        listen=False,
        heartbeat_interval=timedelta(milliseconds=200),
        lease_duration=timedelta(seconds=2),
        shutdown_grace=timedelta(milliseconds=200),
        run_rescuer=False,
    )
    worker = Worker(app, config)
    run = await start_running(worker)
    try:
        job = await endless.enqueue()
        await wait_running(app, job.id)
        assert await app.stop_workers(worker.id) == [worker.id]
        await asyncio.wait_for(run, WAIT_S)
    finally:
        await worker.stop()
        if not run.done():
            run.cancel()

    returned = await app.get_job(job.id)
    assert returned.state is JobState.AVAILABLE
    assert returned.attempt == 0  # refunded
    assert returned.errors == []
    assert returned.lease_token is None
    assert seen == ["shutdown"]
    assert worker.stats.returned == 1
    assert (await row_of(app, worker.id)).state == "stopped"


async def test_stop_all_live_workers_and_unknown_ids(app: App) -> None:
    retired = Worker(app, QUIET, worker_id="w-retired")
    await retired.start()
    await retired.stop()
    first = Worker(app, QUIET, worker_id="w-first")
    second = Worker(app, QUIET, worker_id="w-second")
    runs = [await start_running(first), await start_running(second)]
    try:
        assert await app.stop_workers("no-such-worker") == []
        assert await app.stop_workers("w-retired") == []
        assert await app.stop_workers(None) == ["w-first", "w-second"]
        await asyncio.wait_for(asyncio.gather(*runs), WAIT_S)
    finally:
        for worker in (first, second):
            await worker.stop()
        for run in runs:
            if not run.done():
                run.cancel()

    rows = {w.id: w for w in await app.workers()}
    assert {i: w.state for i, w in rows.items()} == {
        "w-retired": "stopped",
        "w-first": "stopped",
        "w-second": "stopped",
    }
    assert rows["w-retired"].stop_requested_at is None
    assert await app.stop_workers(None) == []


async def test_lost_lease_abandons_the_attempt_and_records_nothing(
    app: App, query_db: QueryDb
) -> None:
    release = asyncio.Event()
    seen: list[Any] = []

    @app.task(name="victim")
    async def victim(ctx: JobContext) -> str:
        try:
            await release.wait()
        except asyncio.CancelledError:
            seen.append(ctx.stop_reason)
            raise
        return "should not be recorded"

    worker = Worker(app, QUIET)
    await worker.start()
    try:
        job = await victim.enqueue()
        await wait_running(app, job.id)
        # Someone else (a rescuer, another worker) now holds the job.
        (stolen,) = await query_db(
            "UPDATE conveyor.jobs SET lease_token = nextval('conveyor.lease_token_seq') "
            "WHERE id = %s RETURNING lease_token",
            job.id,
        )
        before = await app.get_job(job.id)
        assert before.lease_token == stolen["lease_token"]

        reply = await worker.heartbeat_now()
        assert {lease.job_id for lease in reply.lost} == {job.id}
        assert reply.renewed == frozenset()

        async def abandoned() -> bool:
            return worker.stats.lease_lost == 1

        await wait_until(abandoned, "the attempt to be abandoned")
        await worker.wait_until_idle()
        assert worker.running_job_ids == []
        assert seen == ["lease_lost"]
        assert (await app.get_job(job.id)) == before
        assert worker.stats.stale_writes == 0  # not even tried
        assert (worker.stats.succeeded, worker.stats.retried, worker.stats.cancelled) == (0, 0, 0)
    finally:
        release.set()
        await worker.stop()
    assert (await app.get_job(job.id)) == before


async def test_outcome_of_an_attempt_whose_lease_was_taken_is_refused(
    app: App, query_db: QueryDb
) -> None:
    """The zombie finishes before any heartbeat told it: the fenced write refuses it."""
    release = asyncio.Event()

    @app.task(name="zombie")
    async def zombie(ctx: JobContext) -> str:
        await release.wait()
        return "zombie result"

    worker = Worker(app, QUIET)
    await worker.start()
    try:
        job = await zombie.enqueue()
        await wait_running(app, job.id)
        await query_db(
            "UPDATE conveyor.jobs SET lease_token = nextval('conveyor.lease_token_seq') "
            "WHERE id = %s",
            job.id,
        )
        before = await app.get_job(job.id)
        release.set()

        async def refused() -> bool:
            return worker.stats.stale_writes == 1

        await wait_until(refused, "the stale outcome to be refused")
        assert await app.get_job(job.id) == before
        assert before.state is JobState.RUNNING
    finally:
        release.set()
        await worker.stop()


async def test_worker_whose_row_was_pruned_registers_again_on_its_next_beat(
    app: App, query_db: QueryDb
) -> None:
    worker = Worker(app, QUIET)
    await worker.start()
    try:
        await query_db("DELETE FROM conveyor.workers WHERE id = %s", worker.id)
        assert await app.workers() == []
        reply = await worker.heartbeat_now()
        assert not reply.registered
        row = await row_of(app, worker.id)
        assert row.state == "running"
        assert (await worker.heartbeat_now()).registered
    finally:
        await worker.stop()
    assert (await row_of(app, worker.id)).state == "stopped"


async def test_heartbeat_skips_a_row_locked_by_another_transaction_without_losing_it(
    app: App, database_url: str
) -> None:
    import psycopg

    release = asyncio.Event()

    @app.task(name="held")
    async def held(ctx: JobContext) -> None:
        await release.wait()

    worker = Worker(app, QUIET)
    await worker.start()
    try:
        job = await held.enqueue()
        await wait_running(app, job.id)
        conn = await psycopg.AsyncConnection.connect(database_url)
        async with conn, conn.transaction(force_rollback=True):
            await conn.execute("SELECT 1 FROM conveyor.jobs WHERE id = %s FOR UPDATE", [job.id])
            # Must return at once, not wait for the lock, and must not call it lost.
            reply = await asyncio.wait_for(worker.heartbeat_now(), timeout=5)
            assert reply.renewed == frozenset()
            assert reply.lost == frozenset()
        assert worker.running_job_ids == [job.id]
        reply = await worker.heartbeat_now()
        assert reply.renewed == {job.id}
        release.set()
        done = await app.wait(job.id, timeout=10)
        assert done.state is JobState.SUCCEEDED
    finally:
        release.set()
        await worker.stop()
