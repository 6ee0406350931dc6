"""Attempt outcomes as stored: retries on the fake clock, Retry/Snooze/Cancel, timeouts."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from conveyor import App, Cancel, ExponentialBackoff, JobState, Retry, Snooze
from conveyor.testing import advance_time, database_now, drain, freeze_time

FROZEN = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ERROR_KEYS = {"attempt", "type", "message", "traceback", "at"}


async def test_failures_retry_on_the_backoff_schedule_until_failed(app: App) -> None:
    runs: list[int] = []

    @app.task(
        name="always_fails",
        max_attempts=3,
        retry=ExponentialBackoff(base=timedelta(seconds=10), factor=2, jitter=0),
    )
    async def always_fails(ctx: object) -> None:
        runs.append(1)
        raise RuntimeError(f"failure {len(runs)}")

    await freeze_time(app, FROZEN)
    job = await always_fails.enqueue()

    (first,) = await drain(app)
    assert first.state is JobState.SCHEDULED
    assert first.attempt == 1
    assert first.run_at == FROZEN + timedelta(seconds=10)

    await advance_time(app, timedelta(seconds=9))
    (not_yet,) = await drain(app)
    assert not_yet.attempt == 1
    assert len(runs) == 1

    second_at = await advance_time(app, timedelta(seconds=1))
    (second,) = await drain(app)
    assert second.state is JobState.SCHEDULED
    assert second.attempt == 2
    assert second.run_at == second_at + timedelta(seconds=20)

    third_at = await advance_time(app, timedelta(seconds=20))
    (third,) = await drain(app)
    assert third.id == job.id
    assert third.state is JobState.FAILED
    assert third.attempt == 3
    assert third.finished_at == third_at
    assert len(runs) == 3

    assert [e["attempt"] for e in third.errors] == [1, 2, 3]
    assert [e["message"] for e in third.errors] == ["failure 1", "failure 2", "failure 3"]
    for error in third.errors:
        assert set(error) >= ERROR_KEYS
        assert error["type"] == "builtins.RuntimeError"
        assert "RuntimeError" in error["traceback"]
    assert [datetime.fromisoformat(e["at"]) for e in third.errors] == [
        FROZEN,
        second_at,
        third_at,
    ]


async def test_failed_job_is_never_claimed_again(app: App) -> None:
    runs: list[int] = []

    @app.task(name="once", max_attempts=1)
    async def once(ctx: object) -> None:
        runs.append(1)
        raise ValueError("no")

    await freeze_time(app, FROZEN)
    await once.enqueue()
    (failed,) = await drain(app)
    assert failed.state is JobState.FAILED
    await advance_time(app, timedelta(days=30))
    (still_failed,) = await drain(app)
    assert still_failed == failed
    assert runs == [1]


async def test_retry_signal_sets_run_at_by_its_delay(app: App) -> None:
    @app.task(name="later", max_attempts=5)
    async def later(ctx: object) -> None:
        raise Retry(timedelta(minutes=3), reason="come back later")

    await freeze_time(app, FROZEN)
    await later.enqueue()
    (job,) = await drain(app)
    assert job.state is JobState.SCHEDULED
    assert job.run_at == FROZEN + timedelta(minutes=3)
    assert job.attempt == 1
    assert job.errors[0]["message"] == "come back later"
    assert job.errors[0]["type"] == "conveyor.outcomes.Retry"


async def test_retry_without_delay_makes_the_job_available_again(app: App) -> None:
    attempts: list[int] = []

    @app.task(name="twice", max_attempts=3)
    async def twice(ctx: object) -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise Retry(0)
        return "second time lucky"

    await freeze_time(app, FROZEN)
    await twice.enqueue()
    (job,) = await drain(app)
    assert job.state is JobState.SUCCEEDED
    assert job.attempt == 2
    assert job.result == "second time lucky"
    assert len(job.errors) == 1


async def test_snooze_reschedules_without_using_an_attempt(app: App) -> None:
    calls: list[int] = []

    @app.task(name="sleepy", max_attempts=1)
    async def sleepy(ctx: object) -> str:
        calls.append(1)
        if len(calls) == 1:
            raise Snooze(timedelta(minutes=2))
        return "awake"

    await freeze_time(app, FROZEN)
    await sleepy.enqueue()
    (snoozed,) = await drain(app)
    assert snoozed.state is JobState.SCHEDULED
    assert snoozed.attempt == 0
    assert snoozed.errors == []
    assert snoozed.run_at == FROZEN + timedelta(minutes=2)

    await advance_time(app, timedelta(minutes=2))
    (done,) = await drain(app)
    # max_attempts=1 and it still ran a second time: the snooze did not count.
    assert done.state is JobState.SUCCEEDED
    assert done.attempt == 1
    assert done.result == "awake"


async def test_cancel_ends_the_job_with_its_reason(app: App) -> None:
    @app.task(name="doomed", max_attempts=5)
    async def doomed(ctx: object) -> None:
        raise Cancel("account closed")

    await freeze_time(app, FROZEN)
    await doomed.enqueue()
    (job,) = await drain(app)
    assert job.state is JobState.CANCELLED
    assert job.attempt == 1
    assert job.finished_at == FROZEN
    (error,) = job.errors
    assert error["message"] == "account closed"
    assert error["type"] == "conveyor.outcomes.Cancel"


async def test_sync_and_async_tasks_both_succeed_with_results(app: App) -> None:
    @app.task(name="sync_add")
    def sync_add(ctx: object, a: int, b: int) -> int:
        return a + b

    @app.task(name="async_concat")
    async def async_concat(ctx: object, parts: list[str]) -> dict[str, str]:
        await asyncio.sleep(0)
        return {"joined": "".join(parts)}

    await freeze_time(app, FROZEN)
    first = await sync_add.enqueue(a=2, b=3)
    second = await async_concat.enqueue(parts=["con", "veyor"])
    jobs = {j.id: j for j in await drain(app)}

    assert jobs[first.id].state is JobState.SUCCEEDED
    assert jobs[first.id].result == 5
    assert jobs[second.id].result == {"joined": "conveyor"}
    for job in jobs.values():
        assert job.attempt == 1
        assert job.finished_at == FROZEN
        assert job.started_at == FROZEN
        assert job.lease_token is None
        assert job.errors == []


async def test_attempt_past_its_timeout_fails_with_attempt_timeout(app: App) -> None:
    @app.task(name="slow", timeout=0.2, max_attempts=1)
    async def slow(ctx: object) -> None:
        await asyncio.sleep(5)

    await slow.enqueue()
    (job,) = await drain(app, timeout=10)
    assert job.state is JobState.FAILED
    (error,) = job.errors
    assert error["type"] == "conveyor.worker.executor.AttemptTimeout"
    assert "timed out" in error["message"]


async def test_unregistered_task_fails_with_task_not_found(app: App, database_url: str) -> None:
    @app.task(name="known")
    async def known(ctx: object) -> None: ...

    await freeze_time(app, FROZEN)
    job = await known.configure(max_attempts=1).enqueue()
    # A worker process that does not know the task.
    async with App(database_url, schema="conveyor") as stranger:
        (done,) = await drain(stranger)
    assert done.id == job.id
    assert done.state is JobState.FAILED
    assert done.errors[0]["type"] == "conveyor.errors.TaskNotFound"


async def test_clock_helpers_move_the_database_clock(app: App) -> None:
    await freeze_time(app, FROZEN)
    assert await database_now(app) == FROZEN
    assert await advance_time(app, timedelta(hours=2)) == FROZEN + timedelta(hours=2)
    assert await database_now(app) == FROZEN + timedelta(hours=2)
    await freeze_time(app, None)
    assert abs(await database_now(app) - datetime.now(UTC)) < timedelta(minutes=5)
