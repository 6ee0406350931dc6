"""Claim order through a real worker: FIFO, priority, and nothing before its time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from conveyor import App, JobState, WorkerConfig
from conveyor.testing import advance_time, drain, freeze_time

FROZEN = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ONE_AT_A_TIME = WorkerConfig(concurrency=1, poll_interval=timedelta(milliseconds=50))


async def test_jobs_of_equal_priority_start_in_enqueue_order(app: App) -> None:
    started: list[int] = []

    @app.task(name="record")
    async def record(ctx: object, n: int) -> None:
        started.append(n)

    for n in range(10):
        await record.enqueue(n=n)
    jobs = await drain(app, ONE_AT_A_TIME)

    assert started == list(range(10))
    assert all(j.state is JobState.SUCCEEDED for j in jobs)


async def test_jobs_enqueued_together_at_one_instant_start_in_input_order(app: App) -> None:
    started: list[int] = []

    @app.task(name="record")
    def record(ctx: object, n: int) -> None:
        started.append(n)

    # Frozen clock: identical run_at for all, so only the id breaks the tie.
    await freeze_time(app, FROZEN)
    await app.enqueue_many(record.job(n=n) for n in range(10))
    await drain(app, ONE_AT_A_TIME)
    assert started == list(range(10))


async def test_higher_priority_jobs_start_first(app: App) -> None:
    started: list[str] = []

    @app.task(name="record")
    async def record(ctx: object, label: str) -> None:
        started.append(label)

    await freeze_time(app, FROZEN)
    for label, priority in [("low", -10), ("normal-1", 0), ("urgent", 100), ("normal-2", 0)]:
        await record.configure(priority=priority).enqueue(label=label)
    await drain(app, ONE_AT_A_TIME)
    assert started == ["urgent", "normal-1", "normal-2", "low"]


async def test_older_run_at_starts_first_within_a_priority(app: App) -> None:
    started: list[str] = []

    @app.task(name="record")
    async def record(ctx: object, label: str) -> None:
        started.append(label)

    await freeze_time(app, FROZEN)
    await record.configure(run_at=FROZEN - timedelta(minutes=1)).enqueue(label="newer")
    await record.configure(run_at=FROZEN - timedelta(minutes=5)).enqueue(label="older")
    await drain(app, ONE_AT_A_TIME)
    assert started == ["older", "newer"]


async def test_delayed_job_is_not_claimed_before_it_is_due(app: App) -> None:
    runs: list[int] = []

    @app.task(name="later")
    async def later(ctx: object) -> None:
        runs.append(1)

    await freeze_time(app, FROZEN)
    job = await later.configure(delay=timedelta(minutes=10)).enqueue()

    (waiting,) = await drain(app)
    assert waiting.state is JobState.SCHEDULED
    assert waiting.attempt == 0

    await advance_time(app, timedelta(minutes=9, seconds=59))
    (still_waiting,) = await drain(app)
    assert still_waiting.state is JobState.SCHEDULED
    assert runs == []

    await advance_time(app, timedelta(seconds=1))
    (done,) = await drain(app)
    assert done.id == job.id
    assert done.state is JobState.SUCCEEDED
    assert runs == [1]


async def test_due_jobs_run_while_a_delayed_one_waits(app: App) -> None:
    @app.task(name="echo")
    async def echo(ctx: object, n: int) -> int:
        return n

    await freeze_time(app, FROZEN)
    delayed = await echo.configure(delay=timedelta(hours=1)).enqueue(n=0)
    due = [await echo.enqueue(n=n) for n in (1, 2)]
    jobs = {j.id: j for j in await drain(app)}
    assert jobs[delayed.id].state is JobState.SCHEDULED
    assert [jobs[j.id].state for j in due] == [JobState.SUCCEEDED] * 2


async def test_worker_claims_only_its_queues(app: App) -> None:
    @app.task(name="echo")
    async def echo(ctx: object) -> None: ...

    mine = await echo.configure(queue="mine").enqueue()
    theirs = await echo.configure(queue="theirs").enqueue()
    jobs = await drain(
        app, WorkerConfig(queues=("mine",), poll_interval=timedelta(milliseconds=50))
    )
    assert [j.id for j in jobs] == [mine.id]
    assert jobs[0].state is JobState.SUCCEEDED
    assert (await app.get_job(theirs.id)).state is JobState.AVAILABLE
