"""Cancellation: waiting jobs end at once, running ones through their worker (NOTIFY or
heartbeat), and a job whose worker is gone through the rescuer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conveyor import (
    App,
    FixedDelay,
    InvalidJobOptions,
    Job,
    JobContext,
    JobNotFound,
    JobState,
    Worker,
    WorkerConfig,
)
from conveyor.maintenance.rescuer import Rescuer
from conveyor.testing import advance_time, drain, freeze_time
from tests.integration.conftest import QueryDb
from tests.waiting import wait_for_state, wait_until

FROZEN = datetime(2026, 5, 4, 10, 0, tzinfo=UTC)
FAST_POLL = timedelta(milliseconds=50)
WAIT_S = 10.0
CANCEL_WAIT_S = 5.0
NEVER_BEATS = WorkerConfig(
    concurrency=1,
    poll_interval=FAST_POLL,
    # Beats only when a test asks: a cancel can then only arrive by NOTIFY.
    heartbeat_interval=timedelta(seconds=30),
    lease_duration=timedelta(seconds=60),
    run_rescuer=False,
)
BEATS_FAST_NO_LISTEN = WorkerConfig(
    concurrency=1,
    poll_interval=FAST_POLL,
    # No LISTEN: a cancel can only arrive with a heartbeat.
    listen=False,
    heartbeat_interval=timedelta(milliseconds=200),
    lease_duration=timedelta(seconds=2),
    run_rescuer=False,
)


@asynccontextmanager
async def running_worker(app: App, config: WorkerConfig) -> AsyncIterator[Worker]:
    worker = Worker(app, config)
    await worker.start()
    try:
        await asyncio.wait_for(worker.connected.wait(), WAIT_S)
        yield worker
    finally:
        await worker.stop()


async def claim_as_ghost(app: App, lease_s: float = 30.0) -> list[Job]:
    """Claim due jobs as a worker that will never run them (it 'crashed')."""
    rows = await app.db.fetch(
        "claim",
        "job_claim_many",
        {"queues": ["default"], "limit": 10, "worker_id": "ghost", "lease_s": lease_s},
    )
    return sorted((Job.from_row(r) for r in rows), key=lambda j: j.id)


async def cancel_requested_at(query_db: QueryDb, job_id: int) -> Any:
    (row,) = await query_db("SELECT cancel_requested_at FROM conveyor.jobs WHERE id = %s", job_id)
    return row["cancel_requested_at"]


async def test_cancelled_waiting_jobs_never_run_and_the_rest_run_in_order(app: App) -> None:
    started: list[int] = []

    @app.task(name="record")
    async def record(ctx: JobContext, n: int) -> int:
        started.append(n)
        return n

    await freeze_time(app, FROZEN)
    jobs = await app.enqueue_many([record.job(n=n) for n in range(10)])
    doomed = {2, 5, 8}

    one = await app.cancel(jobs[2].id, reason="not needed")
    assert one.state is JobState.CANCELLED
    outcomes = await app.cancel_many(ids=[jobs[5].id, jobs[8].id], reason="not needed")
    assert outcomes == {jobs[5].id: "cancelled", jobs[8].id: "cancelled"}

    for n in doomed:
        cancelled = await app.get_job(jobs[n].id)
        assert cancelled.state is JobState.CANCELLED
        assert cancelled.finished_at == FROZEN
        assert cancelled.attempt == 0
        assert cancelled.lease_token is None
        (error,) = cancelled.errors
        assert error["type"] == "conveyor.Cancelled"
        assert error["message"] == "not needed"
        assert error["attempt"] == 0
        assert datetime.fromisoformat(error["at"]) == FROZEN

    final = await drain(app, WorkerConfig(concurrency=1, poll_interval=FAST_POLL))
    assert started == [n for n in range(10) if n not in doomed]
    by_id = {j.id: j for j in final}
    for n, job in enumerate(jobs):
        expected = JobState.CANCELLED if n in doomed else JobState.SUCCEEDED
        assert by_id[job.id].state is expected
        assert by_id[job.id].result == (None if n in doomed else n)


@pytest.mark.parametrize(
    "config", [NEVER_BEATS, BEATS_FAST_NO_LISTEN], ids=["notify", "heartbeat-fallback"]
)
async def test_cancelling_a_running_async_job_stops_it(
    app: App, query_db: QueryDb, config: WorkerConfig
) -> None:
    never = asyncio.Event()
    seen: dict[str, Any] = {}

    @app.task(name="waits_forever")
    async def waits_forever(ctx: JobContext) -> None:
        try:
            await never.wait()
        except asyncio.CancelledError:
            seen["cancelled_error"] = True
            seen["ctx_cancelled"] = ctx.cancelled
            seen["reason"] = ctx.stop_reason
            raise

    @app.task(name="quick")
    async def quick(ctx: JobContext) -> str:
        return "ran"

    async with running_worker(app, config) as worker:
        job = await waits_forever.enqueue()
        await wait_for_state(app, job.id, "running")

        asked = await app.cancel(job.id, reason="changed my mind")
        assert asked.state in (JobState.RUNNING, JobState.CANCELLED)
        assert await cancel_requested_at(query_db, job.id) is not None

        done = await app.wait(job.id, timeout=CANCEL_WAIT_S)
        assert done.state is JobState.CANCELLED
        assert done.finished_at is not None
        assert done.lease_token is None
        assert done.attempt == 1
        assert done.result is None
        (error,) = done.errors
        assert error["type"] == "conveyor.worker.executor.CancelRequested"
        assert error["attempt"] == 1
        assert seen == {"cancelled_error": True, "ctx_cancelled": True, "reason": "cancel"}

        # The slot is free again (concurrency=1): the next job runs.
        follow_up = await quick.enqueue()
        assert (await app.wait(follow_up.id, timeout=WAIT_S)).result == "ran"
        assert worker.stats.cancelled == 1
        assert worker.stats.succeeded == 1
        assert worker.running_job_ids == []


async def test_cancelling_a_running_sync_job_that_watches_ctx_cancelled(app: App) -> None:
    entered = threading.Event()
    seen: dict[str, Any] = {}

    @app.task(name="polls")
    def polls(ctx: JobContext) -> str:
        entered.set()
        give_up = time.monotonic() + 20  # only if the cancel never arrives
        while not ctx.cancelled:
            if time.monotonic() > give_up:
                return "never cancelled"
            time.sleep(0.01)
        seen["reason"] = ctx.stop_reason
        return "stopped early"

    async with running_worker(app, NEVER_BEATS) as worker:
        job = await polls.enqueue()
        await wait_for_state(app, job.id, "running")
        assert await asyncio.to_thread(entered.wait, WAIT_S)

        await app.cancel(job.id)
        done = await app.wait(job.id, timeout=CANCEL_WAIT_S)

    assert done.state is JobState.CANCELLED
    assert done.result is None  # the value returned after the cancel is not recorded
    assert [e["type"] for e in done.errors] == ["conveyor.worker.executor.CancelRequested"]
    assert seen == {"reason": "cancel"}
    assert worker.stats.cancelled == 1
    assert worker.stats.leaked == 0


async def test_cancel_of_finished_missing_or_unfiltered_jobs(app: App) -> None:
    @app.task(name="fine")
    async def fine(ctx: JobContext) -> str:
        return "fine"

    await freeze_time(app, FROZEN)
    job = await fine.enqueue()
    (finished,) = await drain(app, WorkerConfig(poll_interval=FAST_POLL))
    assert finished.state is JobState.SUCCEEDED

    await advance_time(app, timedelta(minutes=1))
    assert await app.cancel(job.id) == finished
    assert await app.cancel_many(ids=[job.id]) == {}
    assert await app.get_job(job.id) == finished

    with pytest.raises(JobNotFound):
        await app.cancel(job.id + 1000)
    assert await app.cancel_many(ids=[job.id + 1000]) == {}

    with pytest.raises(InvalidJobOptions):
        await app.cancel_many()
    with pytest.raises(InvalidJobOptions):
        await app.cancel_many(reason="everything")
    assert await app.get_job(job.id) == finished


async def test_bulk_cancel_by_queue_and_by_task_touches_only_matching_unfinished_jobs(
    app: App, query_db: QueryDb
) -> None:
    @app.task(name="alpha")
    async def alpha(ctx: JobContext) -> None: ...

    @app.task(name="beta")
    async def beta(ctx: JobContext) -> None: ...

    await freeze_time(app, FROZEN)
    done_in_a = await alpha.configure(queue="a").enqueue()
    await drain(app, WorkerConfig(queues=("a",), poll_interval=FAST_POLL))
    running = await alpha.enqueue()  # queue default
    (claimed,) = await claim_as_ghost(app)
    assert claimed.id == running.id
    a1 = await alpha.configure(queue="a").enqueue()
    a2 = await beta.configure(queue="a", delay=timedelta(hours=1)).enqueue()  # scheduled
    b1 = await alpha.configure(queue="b").enqueue()
    b2 = await beta.configure(queue="b").enqueue()
    d1 = await beta.enqueue()

    assert await app.cancel_many(queue="a") == {a1.id: "cancelled", a2.id: "cancelled"}
    assert (await app.get_job(done_in_a.id)).state is JobState.SUCCEEDED
    assert [j.state for j in await app.get_jobs([b1.id, b2.id, d1.id])] == ["available"] * 3

    # Both filters must match.
    assert await app.cancel_many(queue="b", task="beta") == {b2.id: "cancelled"}
    assert (await app.get_job(b1.id)).state is JobState.AVAILABLE

    # By task: the waiting one ends, the running one gets a request.
    assert await app.cancel_many(task="alpha") == {
        running.id: "cancel_requested",
        b1.id: "cancelled",
    }
    still_running = await app.get_job(running.id)
    assert still_running.state is JobState.RUNNING
    assert still_running.lease_token == claimed.lease_token
    assert await cancel_requested_at(query_db, running.id) == FROZEN
    assert (await app.get_job(d1.id)).state is JobState.AVAILABLE
    # Already cancelled jobs are not matched again.
    assert await app.cancel_many(queue="a") == {}


async def test_cancel_requested_while_the_worker_is_gone_is_finished_by_the_rescuer(
    app: App, query_db: QueryDb
) -> None:
    @app.task(name="orphan", max_attempts=5)
    async def orphan(ctx: JobContext) -> None: ...

    await freeze_time(app, FROZEN)
    job = await orphan.enqueue()
    (claimed,) = await claim_as_ghost(app, lease_s=30)
    assert claimed.id == job.id

    asked = await app.cancel(job.id)
    assert asked.state is JobState.RUNNING
    assert await cancel_requested_at(query_db, job.id) == FROZEN

    rescuer = Rescuer(app.db, interval=timedelta(seconds=60), dead_after=timedelta(seconds=60))
    assert (await rescuer.run_once()).rescued == {}  # the lease is still valid
    now = await advance_time(app, timedelta(seconds=31))
    report = await rescuer.run_once()
    assert report.rescued == {job.id: "cancelled"}

    rescued = await app.get_job(job.id)
    assert rescued.state is JobState.CANCELLED
    assert rescued.finished_at == now
    assert rescued.attempt == 1
    assert rescued.lease_token is None
    assert rescued.lease_expires_at is None
    assert rescued.errors[-1]["type"] == "conveyor.LeaseExpired"

    # Not retried: a worker finds nothing to run, even much later.
    ran: list[int] = []

    @app.task(name="orphan", max_attempts=5)
    async def orphan_again(ctx: JobContext) -> None:
        ran.append(1)

    await advance_time(app, timedelta(hours=1))
    (after,) = await drain(app, WorkerConfig(poll_interval=FAST_POLL))
    assert ran == []
    assert after == rescued


async def test_cancel_requested_then_the_attempt_fails_ends_cancelled_not_retried(
    app: App, query_db: QueryDb
) -> None:
    """The worker has not heard the cancel (no LISTEN, no beat yet) when the attempt
    raises: the request must still win over the retry, as it does in the rescuer."""
    go = asyncio.Event()
    attempts: list[int] = []

    @app.task(name="fails_late", max_attempts=3, retry=FixedDelay(timedelta(minutes=1)))
    async def fails_late(ctx: JobContext) -> None:
        attempts.append(ctx.attempt)
        await go.wait()
        raise RuntimeError("boom")

    await freeze_time(app, FROZEN)
    config = WorkerConfig(
        concurrency=1,
        poll_interval=FAST_POLL,
        listen=False,
        heartbeat_interval=timedelta(seconds=30),
        lease_duration=timedelta(seconds=60),
        run_rescuer=False,
    )
    async with running_worker(app, config) as worker:
        job = await fails_late.enqueue()
        await wait_for_state(app, job.id, "running")
        assert (await app.cancel(job.id)).state is JobState.RUNNING
        go.set()

        async def outcome_written() -> bool:
            return (await app.get_job(job.id)).state != "running"

        await wait_until(outcome_written, "the attempt's outcome")
        await worker.wait_until_idle()

    final = await app.get_job(job.id)
    assert attempts == [1]
    assert final.state is JobState.CANCELLED, (
        f"cancel was requested, yet the job is {final.state} after attempt {final.attempt}"
    )
    assert final.finished_at is not None
