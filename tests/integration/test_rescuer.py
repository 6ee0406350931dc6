"""The rescuer on the fake database clock: expired leases go back to the queue with
backoff, fenced against completion and renewal, one rescuer at a time, dead workers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from conveyor import App, Job, JobContext, JobState, Worker, WorkerConfig
from conveyor.db.control import jobs_channel
from conveyor.maintenance.rescuer import RESCUE_BACKOFF_MAX, Rescuer, RescueReport
from conveyor.testing import advance_time, freeze_time
from tests.integration.conftest import QueryDb

FROZEN = datetime(2026, 7, 1, 8, 0, tzinfo=UTC)
LEASE_S = 30.0
LEASE = timedelta(seconds=LEASE_S)
WAIT_S = 10.0


def make_rescuer(app: App, **options: timedelta) -> Rescuer:
    return Rescuer(
        app.db, interval=timedelta(seconds=60), dead_after=timedelta(seconds=60), **options
    )


async def claim(app: App, worker_id: str = "ghost") -> list[Job]:
    """Claim due jobs as a worker that never runs them (it 'crashed' right after)."""
    rows = await app.db.fetch(
        "claim",
        "job_claim_many",
        {"queues": ["default"], "limit": 10, "worker_id": worker_id, "lease_s": LEASE_S},
    )
    return sorted((Job.from_row(r) for r in rows), key=lambda j: j.id)


def register_noop(app: App, max_attempts: int = 3) -> None:
    @app.task(name="noop", max_attempts=max_attempts)
    async def noop(ctx: JobContext) -> None: ...


async def test_expired_lease_is_rescued_with_doubling_backoff_until_failed(app: App) -> None:
    register_noop(app, max_attempts=3)
    await freeze_time(app, FROZEN)
    job = await app.enqueue("noop")
    (claimed,) = await claim(app)
    assert claimed.lease_expires_at == FROZEN + LEASE
    rescuer = make_rescuer(app)

    # One second before expiry, and at the very instant of expiry: still valid.
    for step in (LEASE - timedelta(seconds=1), timedelta(seconds=1)):
        await advance_time(app, step)
        report = await rescuer.run_once()
        assert report == RescueReport(ran=True)
        untouched = await app.get_job(job.id)
        assert (untouched.state, untouched.lease_token) == ("running", claimed.lease_token)

    now = await advance_time(app, timedelta(seconds=1))
    report = await rescuer.run_once()
    assert report.rescued == {job.id: "scheduled"}
    assert report.skipped == 0
    first = await app.get_job(job.id)
    assert first.state is JobState.SCHEDULED
    assert first.run_at == now + timedelta(seconds=1)
    assert first.attempt == 1  # the lost attempt counts
    assert (first.lease_token, first.lease_expires_at, first.finished_at) == (None, None, None)
    (error,) = first.errors
    assert error["type"] == "conveyor.LeaseExpired"
    assert error["attempt"] == 1
    assert "ghost" in error["message"]
    assert datetime.fromisoformat(error["at"]) == now

    # Attempt 2: the backoff doubles.
    await advance_time(app, timedelta(seconds=1))
    (second_claim,) = await claim(app)
    assert second_claim.attempt == 2
    assert second_claim.lease_token != claimed.lease_token
    now = await advance_time(app, LEASE + timedelta(seconds=1))
    assert (await rescuer.run_once()).rescued == {job.id: "scheduled"}
    second = await app.get_job(job.id)
    assert second.run_at == now + timedelta(seconds=2)

    # Attempt 3 is the last: the rescue ends the job.
    await advance_time(app, timedelta(seconds=2))
    (third_claim,) = await claim(app)
    assert third_claim.attempt == 3
    now = await advance_time(app, LEASE + timedelta(seconds=1))
    assert (await rescuer.run_once()).rescued == {job.id: "failed"}
    failed = await app.get_job(job.id)
    assert failed.state is JobState.FAILED
    assert failed.finished_at == now
    assert failed.lease_token is None
    assert [e["type"] for e in failed.errors] == ["conveyor.LeaseExpired"] * 3
    assert [e["attempt"] for e in failed.errors] == [1, 2, 3]

    # Nothing left to rescue, and a failed job is never claimed again.
    await advance_time(app, timedelta(hours=1))
    assert (await rescuer.run_once()).rescued == {}
    assert await claim(app) == []


async def test_rescue_backoff_is_capped(app: App) -> None:
    register_noop(app, max_attempts=10)
    await freeze_time(app, FROZEN)
    job = await app.enqueue("noop")
    rescuer = make_rescuer(app, backoff_max=timedelta(seconds=3))
    delays = []
    for _ in range(4):
        await claim(app)
        now = await advance_time(app, LEASE + timedelta(seconds=1))
        assert (await rescuer.run_once()).rescued == {job.id: "scheduled"}
        rescued = await app.get_job(job.id)
        delays.append(rescued.run_at - now)
        await advance_time(app, rescued.run_at - now)
    assert delays == [timedelta(seconds=s) for s in (1, 2, 3, 3)]


async def test_default_backoff_cap_holds_for_any_attempt_number(
    app: App, query_db: QueryDb
) -> None:
    """A long-lived job (max_attempts up to 1 000 000) may be rescued at a high attempt:
    the backoff must stay at its cap, and one such job must not break the whole pass."""
    register_noop(app, max_attempts=1_000_000)
    await freeze_time(app, FROZEN)
    moderate, huge, ordinary = await app.enqueue_many(
        [app.get_task("noop").job() for _ in range(3)]
    )
    await claim(app)
    await query_db("UPDATE conveyor.jobs SET attempt = 20 WHERE id = %s", moderate.id)
    await query_db("UPDATE conveyor.jobs SET attempt = 2000 WHERE id = %s", huge.id)
    now = await advance_time(app, LEASE + timedelta(seconds=1))

    report = await make_rescuer(app).run_once()

    assert report.rescued == {
        moderate.id: "scheduled",
        huge.id: "scheduled",
        ordinary.id: "scheduled",
    }
    jobs = {j.id: j for j in await app.get_jobs([moderate.id, huge.id, ordinary.id])}
    assert jobs[moderate.id].run_at == now + RESCUE_BACKOFF_MAX
    assert jobs[huge.id].run_at == now + RESCUE_BACKOFF_MAX
    assert jobs[ordinary.id].run_at == now + timedelta(seconds=1)


async def test_rescue_racing_a_completion_leaves_the_completed_job_alone(app: App) -> None:
    register_noop(app)
    await freeze_time(app, FROZEN)
    job = await app.enqueue("noop")
    (claimed,) = await claim(app)
    now = await advance_time(app, LEASE + timedelta(seconds=1))
    rescuer = make_rescuer(app)
    recorded: list[int] = []

    async def late_worker_records_success() -> None:
        # The worker was slow, not dead: its outcome lands after the rescuer read
        # the expired lease, through the real fenced statement.
        rows = await app.db.fetch(
            "record job outcomes",
            "job_finish_many",
            {
                "id": [claimed.id],
                "token": [claimed.lease_token],
                "state": ["succeeded"],
                "result": ['{"answer": 42}'],
                "error": [None],
                "retry_in_s": [None],
                "refund": [False],
                "channel": jobs_channel(app.config.schema),
            },
        )
        recorded.extend(int(r["id"]) for r in rows)

    rescuer.between_read_and_write = late_worker_records_success
    report = await rescuer.run_once()

    assert recorded == [job.id]
    assert report.ran
    assert report.rescued == {}
    assert report.skipped == 1
    done = await app.get_job(job.id)
    assert done.state is JobState.SUCCEEDED
    assert done.result == {"answer": 42}
    assert done.finished_at == now
    assert done.errors == []
    assert done.attempt == 1


async def test_rescue_racing_a_lease_renewal_leaves_the_job_running(app: App) -> None:
    register_noop(app)
    await freeze_time(app, FROZEN)
    job = await app.enqueue("noop")
    (claimed,) = await claim(app)
    now = await advance_time(app, LEASE + timedelta(seconds=1))
    rescuer = make_rescuer(app)
    renewed: list[int] = []

    async def heartbeat_lands() -> None:
        rows = await app.db.fetch(
            "heartbeat",
            "lease_extend_many",
            {"id": [claimed.id], "token": [claimed.lease_token], "lease_s": LEASE_S},
        )
        renewed.extend(int(r["id"]) for r in rows)

    rescuer.between_read_and_write = heartbeat_lands
    report = await rescuer.run_once()

    assert renewed == [job.id]
    assert (report.rescued, report.skipped) == ({}, 1)
    still = await app.get_job(job.id)
    assert still.state is JobState.RUNNING
    assert still.lease_token == claimed.lease_token
    assert still.lease_expires_at == now + LEASE
    assert still.errors == []

    # Without the hook, the next pass finds nothing expired.
    rescuer.between_read_and_write = None
    assert await rescuer.run_once() == RescueReport(ran=True)


async def test_only_one_rescuer_works_at_a_time(app: App) -> None:
    register_noop(app)
    await freeze_time(app, FROZEN)
    job = await app.enqueue("noop")
    await claim(app)
    await advance_time(app, LEASE + timedelta(seconds=1))

    first, second = make_rescuer(app), make_rescuer(app)
    inside = asyncio.Event()
    release = asyncio.Event()

    async def hold_the_lock() -> None:
        inside.set()
        await release.wait()

    first.between_read_and_write = hold_the_lock
    first_pass = asyncio.create_task(first.run_once())
    try:
        await asyncio.wait_for(inside.wait(), WAIT_S)
        assert await second.run_once() == RescueReport(ran=False)
        assert (await app.get_job(job.id)).state is JobState.RUNNING
    finally:
        release.set()
        first_report = await asyncio.wait_for(first_pass, WAIT_S)

    assert first_report.ran
    assert first_report.rescued == {job.id: "scheduled"}
    # The lock is released at commit: the other rescuer may work now.
    assert await second.run_once() == RescueReport(ran=True)


async def test_silent_worker_is_marked_dead_and_a_heartbeat_revives_it(app: App) -> None:
    await freeze_time(app, FROZEN)
    config = WorkerConfig(
        run_rescuer=False,
        poll_interval=timedelta(seconds=1),
        heartbeat_interval=timedelta(seconds=30),  # no background beat during the test
        lease_duration=timedelta(seconds=120),
        dead_after=timedelta(seconds=60),
    )
    silent = Worker(app, config, worker_id="silent")
    retired = Worker(app, config, worker_id="retired")
    await silent.start()
    await retired.start()
    await retired.stop()
    try:
        rescuer = silent.rescuer
        await advance_time(app, timedelta(seconds=59))
        assert (await rescuer.run_once()).dead_workers == []

        await advance_time(app, timedelta(seconds=2))
        report = await rescuer.run_once()
        assert report.dead_workers == ["silent"]
        states = {w.id: w.state for w in await app.workers()}
        assert states == {"silent": "dead", "retired": "stopped"}
        assert [w.id for w in await app.workers(live_only=True)] == []
        # Already dead: not reported again.
        assert (await rescuer.run_once()).dead_workers == []

        now = await advance_time(app, timedelta(seconds=5))
        reply = await silent.heartbeat_now()
        assert reply.registered
        (revived,) = await app.workers(live_only=True)
        assert (revived.id, revived.state, revived.heartbeat_at) == ("silent", "running", now)
        assert revived.heartbeat_age_s == 0
        assert (await rescuer.run_once()).dead_workers == []
    finally:
        await silent.stop()
    states = {w.id: w.state for w in await app.workers()}
    assert states == {"silent": "stopped", "retired": "stopped"}


async def test_stopping_worker_marked_dead_comes_back_as_stopping(app: App) -> None:
    """A beat revives a worker wrongly marked dead, but must not undo its `stopping`."""
    release = asyncio.Event()

    @app.task(name="draining")
    async def draining(ctx: JobContext) -> None:
        await release.wait()

    await freeze_time(app, FROZEN)
    worker = Worker(
        app,
        WorkerConfig(
            run_rescuer=False,
            poll_interval=timedelta(milliseconds=50),
            heartbeat_interval=timedelta(seconds=30),
            lease_duration=timedelta(seconds=120),
            dead_after=timedelta(seconds=60),
        ),
        worker_id="draining-worker",
    )
    await worker.start()
    stopping: asyncio.Task[None] | None = None
    try:
        job = await app.enqueue("draining")

        async def job_running() -> bool:
            return (await app.get_job(job.id)).state == "running"

        async def worker_stopping() -> bool:
            return [w.state for w in await app.workers()] == ["stopping"]

        await _poll(job_running)
        stopping = asyncio.create_task(worker.stop())  # waits for the running job
        await _poll(worker_stopping)

        await advance_time(app, timedelta(seconds=61))
        assert (await make_rescuer(app).run_once()).dead_workers == [worker.id]
        await worker.heartbeat_now()
        (row,) = await app.workers()
        assert row.state == "stopping"
    finally:
        release.set()
        if stopping is not None:
            await asyncio.wait_for(stopping, WAIT_S)
        await worker.stop()
    (row,) = await app.workers()
    assert row.state == "stopped"


async def _poll(check: Callable[[], Awaitable[bool]]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not await check():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)
