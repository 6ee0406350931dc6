"""The executor turns whatever an attempt does into an Outcome, with no database."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conveyor import App, Cancel, Config, FixedDelay, Job, JobState, Retry, Snooze, Task
from conveyor.context import JobContext
from conveyor.worker.executor import execute
from conveyor.worker.outcome import Outcome

TOKEN = 41
POLICY_DELAY = timedelta(seconds=30)


@pytest.fixture
def offline() -> App:
    """An App that never connects; tasks are registered on it per test."""
    return App(config=Config(database_url="postgresql://unit-tests-never-connect.invalid/x"))


@pytest.fixture
def threads() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=2)
    yield pool
    pool.shutdown(wait=False, cancel_futures=True)


def claimed(
    task: str,
    *,
    attempt: int = 1,
    max_attempts: int = 3,
    timeout_ms: int | None = None,
    **args: Any,
) -> Job:
    """A job as the claim query returns it: running, leased, attempt counted."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return Job(
        id=7,
        queue="default",
        task=task,
        args=args,
        state=JobState.RUNNING,
        priority=0,
        attempt=attempt,
        max_attempts=max_attempts,
        run_at=now,
        created_at=now,
        started_at=now,
        lease_token=TOKEN,
        lease_expires_at=now + timedelta(seconds=30),
        worker_id="w1",
        timeout_ms=timeout_ms,
    )


async def run(app: App, task: Task | None, job: Job, threads: ThreadPoolExecutor) -> Outcome:
    ctx = JobContext(app=app, job=job, worker_id="w1")
    return await execute(job, task, ctx, threads)


def error_of(outcome: Outcome) -> dict[str, Any]:
    assert outcome.error is not None
    record: dict[str, Any] = json.loads(outcome.error)
    return record


async def test_success_records_the_json_result(offline: App, threads: ThreadPoolExecutor) -> None:
    @offline.task(name="add")
    async def add(ctx: JobContext, a: int, b: int) -> dict[str, int]:
        return {"sum": a + b}

    outcome = await run(offline, add, claimed("add", a=1, b=2), threads)
    assert outcome == Outcome(7, TOKEN, "succeeded", result='{"sum":3}')


async def test_sync_task_succeeds_in_the_thread_pool(
    offline: App, threads: ThreadPoolExecutor
) -> None:
    @offline.task(name="double")
    def double(ctx: JobContext, x: int) -> int:
        return x * 2

    outcome = await run(offline, double, claimed("double", x=21), threads)
    assert outcome.state == "succeeded"
    assert outcome.result == "42"


async def test_task_receives_the_job_context(offline: App, threads: ThreadPoolExecutor) -> None:
    @offline.task(name="who")
    async def who(ctx: JobContext) -> list[Any]:
        return [ctx.job.id, ctx.attempt, ctx.worker_id]

    outcome = await run(offline, who, claimed("who", attempt=2), threads)
    assert outcome.result == '[7,2,"w1"]'


async def test_exception_schedules_a_retry_after_the_policy_delay(
    offline: App, threads: ThreadPoolExecutor
) -> None:
    @offline.task(name="flaky", retry=FixedDelay(POLICY_DELAY))
    async def flaky(ctx: JobContext) -> None:
        raise ValueError("downstream said no")

    outcome = await run(offline, flaky, claimed("flaky", attempt=1, max_attempts=3), threads)
    assert outcome.state == "retry"
    assert outcome.retry_in_s == POLICY_DELAY.total_seconds()
    assert not outcome.refund
    error = error_of(outcome)
    assert error["attempt"] == 1
    assert error["type"] == "builtins.ValueError"
    assert error["message"] == "downstream said no"
    assert "downstream said no" in error["traceback"]


async def test_policy_is_asked_with_the_attempt_that_failed(
    offline: App, threads: ThreadPoolExecutor
) -> None:
    asked: list[int] = []

    def policy(attempt: int) -> timedelta:
        asked.append(attempt)
        return timedelta(seconds=attempt * 10)

    @offline.task(name="flaky", retry=policy)
    def flaky(ctx: JobContext) -> None:
        raise RuntimeError("no")

    outcome = await run(offline, flaky, claimed("flaky", attempt=2, max_attempts=5), threads)
    assert asked == [2]
    assert outcome.retry_in_s == 20.0


async def test_exception_at_max_attempts_fails_for_good(
    offline: App, threads: ThreadPoolExecutor
) -> None:
    @offline.task(name="flaky")
    async def flaky(ctx: JobContext) -> None:
        raise ValueError("still no")

    outcome = await run(offline, flaky, claimed("flaky", attempt=3, max_attempts=3), threads)
    assert outcome.state == "failed"
    assert outcome.retry_in_s is None
    assert error_of(outcome)["attempt"] == 3


async def test_retry_signal_honours_its_delay(offline: App, threads: ThreadPoolExecutor) -> None:
    @offline.task(name="later", retry=FixedDelay(POLICY_DELAY))
    async def later(ctx: JobContext) -> None:
        raise Retry(timedelta(seconds=5), reason="rate limited")

    outcome = await run(offline, later, claimed("later"), threads)
    assert outcome.state == "retry"
    assert outcome.retry_in_s == 5.0
    assert not outcome.refund
    error = error_of(outcome)
    assert error["type"] == "conveyor.outcomes.Retry"
    assert error["message"] == "rate limited"


async def test_retry_signal_accepts_seconds_and_falls_back_to_the_policy(
    offline: App, threads: ThreadPoolExecutor
) -> None:
    @offline.task(name="seconds", retry=FixedDelay(POLICY_DELAY))
    async def in_seconds(ctx: JobContext) -> None:
        raise Retry(2.5)

    @offline.task(name="policy", retry=FixedDelay(POLICY_DELAY))
    async def by_policy(ctx: JobContext) -> None:
        raise Retry()

    assert (await run(offline, in_seconds, claimed("seconds"), threads)).retry_in_s == 2.5
    outcome = await run(offline, by_policy, claimed("policy"), threads)
    assert outcome.retry_in_s == POLICY_DELAY.total_seconds()


async def test_retry_signal_at_max_attempts_fails(
    offline: App, threads: ThreadPoolExecutor
) -> None:
    @offline.task(name="later")
    async def later(ctx: JobContext) -> None:
        raise Retry(1)

    outcome = await run(offline, later, claimed("later", attempt=2, max_attempts=2), threads)
    assert outcome.state == "failed"


async def test_snooze_refunds_the_attempt_without_an_error(
    offline: App, threads: ThreadPoolExecutor
) -> None:
    @offline.task(name="sleepy")
    async def sleepy(ctx: JobContext) -> None:
        raise Snooze(timedelta(minutes=1))

    # Even on the last attempt a snooze is not a failure.
    outcome = await run(offline, sleepy, claimed("sleepy", attempt=3, max_attempts=3), threads)
    assert outcome == Outcome(7, TOKEN, "retry", error=None, retry_in_s=60.0, refund=True)


async def test_cancel_ends_the_job_with_its_reason(
    offline: App, threads: ThreadPoolExecutor
) -> None:
    @offline.task(name="doomed")
    def doomed(ctx: JobContext) -> None:
        raise Cancel("customer deleted")

    outcome = await run(offline, doomed, claimed("doomed", attempt=1, max_attempts=5), threads)
    assert outcome.state == "cancelled"
    error = error_of(outcome)
    assert error["message"] == "customer deleted"
    assert error["type"] == "conveyor.outcomes.Cancel"
    assert "traceback" not in error


async def test_async_timeout_is_a_failure_with_attempt_timeout(
    offline: App, threads: ThreadPoolExecutor
) -> None:
    seen: list[JobContext] = []

    @offline.task(name="slow")
    async def slow(ctx: JobContext) -> None:
        seen.append(ctx)
        await asyncio.sleep(30)

    job = claimed("slow", attempt=1, max_attempts=1, timeout_ms=50)
    outcome = await asyncio.wait_for(run(offline, slow, job, threads), 5)
    assert outcome.state == "failed"
    error = error_of(outcome)
    assert error["type"] == "conveyor.worker.executor.AttemptTimeout"
    assert "timed out" in error["message"]
    assert seen[0].cancelled
    assert seen[0].stop_reason == "timeout"


async def test_sync_timeout_is_a_failure_and_asks_the_function_to_stop(
    offline: App, threads: ThreadPoolExecutor
) -> None:
    @offline.task(name="slow")
    def slow(ctx: JobContext) -> None:
        deadline = time.monotonic() + 5
        while not ctx.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)

    job = claimed("slow", attempt=1, max_attempts=2, timeout_ms=50)
    outcome = await asyncio.wait_for(run(offline, slow, job, threads), 5)
    assert outcome.state == "retry"
    assert error_of(outcome)["type"] == "conveyor.worker.executor.AttemptTimeout"


async def test_non_json_result_fails_for_good(offline: App, threads: ThreadPoolExecutor) -> None:
    """Running again cannot make the result storable: no retry, whatever attempts are left."""

    @offline.task(name="odd")
    async def odd(ctx: JobContext) -> object:
        return {1, 2, 3}

    outcome = await run(offline, odd, claimed("odd", attempt=1, max_attempts=5), threads)
    assert outcome.state == "failed"
    error = error_of(outcome)
    assert error["type"] == "conveyor.outcomes.Fail"
    assert "not JSON-serialisable" in error["message"]


async def test_nan_result_is_a_failure(offline: App, threads: ThreadPoolExecutor) -> None:
    @offline.task(name="nan")
    async def nan(ctx: JobContext) -> float:
        return float("nan")

    outcome = await run(offline, nan, claimed("nan", attempt=1, max_attempts=1), threads)
    assert outcome.state == "failed"


async def test_unregistered_task_is_a_failure_with_task_not_found(
    offline: App, threads: ThreadPoolExecutor
) -> None:
    outcome = await run(offline, None, claimed("gone", attempt=1, max_attempts=1), threads)
    assert outcome.state == "failed"
    assert error_of(outcome)["type"] == "conveyor.errors.TaskNotFound"


async def test_worker_cancellation_returns_the_job_with_its_attempt_refunded(
    offline: App, threads: ThreadPoolExecutor
) -> None:
    started = asyncio.Event()
    contexts: list[JobContext] = []

    @offline.task(name="long")
    async def long(ctx: JobContext) -> None:
        contexts.append(ctx)
        started.set()
        await asyncio.sleep(30)

    runner = asyncio.create_task(run(offline, long, claimed("long"), threads))
    await asyncio.wait_for(started.wait(), 5)
    # What the worker does past its shutdown grace: say why, then cancel.
    contexts[0].request_stop("shutdown")
    runner.cancel()
    outcome = await asyncio.wait_for(runner, 5)
    assert outcome == Outcome(7, TOKEN, "retry", error=None, retry_in_s=0.0, refund=True)


async def test_cancelled_error_raised_by_the_task_itself_is_a_failure(
    offline: App, threads: ThreadPoolExecutor
) -> None:
    @offline.task(name="confused", retry=FixedDelay(POLICY_DELAY))
    async def confused(ctx: JobContext) -> None:
        raise asyncio.CancelledError

    outcome = await run(offline, confused, claimed("confused", attempt=1, max_attempts=2), threads)
    assert outcome.state == "retry"
    assert not outcome.refund
    assert outcome.retry_in_s == POLICY_DELAY.total_seconds()
    assert error_of(outcome)["type"] == "asyncio.exceptions.CancelledError"
