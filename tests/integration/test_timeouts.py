"""Attempt timeouts: failures retried per policy, and attempts that ignore the
cancellation past the hard limit (leaked slots) without holding up the job's outcome."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from conveyor import App, FixedDelay, JobContext, JobState, Task, Worker, WorkerConfig
from conveyor.testing import advance_time, freeze_time
from tests.waiting import wait_for_state, wait_until

FROZEN = datetime(2026, 9, 1, 6, 0, tzinfo=UTC)
TIMEOUT_S = 0.2
HARD_LIMIT = timedelta(milliseconds=300)
WAIT_S = 10.0
TIMEOUT_TYPE = "conveyor.worker.executor.AttemptTimeout"


def config(**overrides: object) -> WorkerConfig:
    options: dict[str, object] = {
        "concurrency": 1,
        "poll_interval": timedelta(milliseconds=50),
        "heartbeat_interval": timedelta(seconds=30),
        "lease_duration": timedelta(seconds=60),
        "run_rescuer": False,
        "cancel_hard_limit": HARD_LIMIT,
    }
    options.update(overrides)
    return WorkerConfig(**options)  # type: ignore[arg-type]


@asynccontextmanager
async def running_worker(app: App, worker_config: WorkerConfig) -> AsyncIterator[Worker]:
    worker = Worker(app, worker_config)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


async def leaked_in_registry(app: App, worker: Worker) -> int:
    (row,) = [w for w in await app.workers() if w.id == worker.id]
    return row.leaked_slots


async def test_timed_out_attempts_are_retried_at_once_then_fail(app: App) -> None:
    attempts: list[int] = []

    @app.task(name="sleeper", timeout=TIMEOUT_S, max_attempts=3, retry=FixedDelay(timedelta(0)))
    async def sleeper(ctx: JobContext) -> None:
        attempts.append(ctx.attempt)
        await asyncio.sleep(5)

    async with running_worker(app, config()) as worker:
        job = await sleeper.enqueue()
        done = await app.wait(job.id, timeout=WAIT_S)

    assert attempts == [1, 2, 3]
    assert done.state is JobState.FAILED
    assert done.attempt == 3
    assert done.finished_at is not None
    assert [e["type"] for e in done.errors] == [TIMEOUT_TYPE] * 3
    assert [e["attempt"] for e in done.errors] == [1, 2, 3]
    assert all("timed out after 0.2s" in e["message"] for e in done.errors)
    assert (worker.stats.retried, worker.stats.failed, worker.stats.leaked) == (2, 1, 0)


async def test_timed_out_attempt_is_scheduled_per_retry_policy(app: App) -> None:
    @app.task(
        name="slowpoke", timeout=TIMEOUT_S, max_attempts=2, retry=FixedDelay(timedelta(minutes=1))
    )
    async def slowpoke(ctx: JobContext) -> None:
        await asyncio.sleep(5)

    await freeze_time(app, FROZEN)
    async with running_worker(app, config()):
        job = await slowpoke.enqueue()
        retrying = await wait_for_state(app, job.id, "scheduled")
        assert retrying.attempt == 1
        assert retrying.run_at == FROZEN + timedelta(minutes=1)
        assert retrying.lease_token is None
        assert [e["type"] for e in retrying.errors] == [TIMEOUT_TYPE]

        await advance_time(app, timedelta(minutes=1))
        done = await app.wait(job.id, timeout=WAIT_S)

    assert done.state is JobState.FAILED
    assert done.attempt == 2
    assert [e["type"] for e in done.errors] == [TIMEOUT_TYPE] * 2


def _stubborn(app: App, release: asyncio.Event, swallowed: list[int], **options: Any) -> Task:
    """A task that swallows every cancellation (noting it) until `release` is set."""

    @app.task(name="stubborn", max_attempts=1, **options)
    async def stubborn(ctx: JobContext) -> str:
        while not release.is_set():
            try:
                await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                swallowed.append(1)  # and carry on regardless
        return "finally done"

    return stubborn


async def test_async_attempt_ignoring_cancellation_leaks_its_slot_but_the_job_moves_on(
    app: App,
) -> None:
    release = asyncio.Event()
    swallowed: list[int] = []

    stubborn = _stubborn(app, release, swallowed, timeout=TIMEOUT_S)

    @app.task(name="next_one")
    async def next_one(ctx: JobContext) -> str:
        return "ran"

    try:
        async with running_worker(app, config()) as worker:
            job = await stubborn.enqueue()
            done = await app.wait(job.id, timeout=WAIT_S)
            assert done.state is JobState.FAILED
            assert [e["type"] for e in done.errors] == [TIMEOUT_TYPE]
            assert swallowed == [1]
            assert worker.leaked_slots == 1
            assert worker.stats.leaked == 1
            assert worker.running_job_ids == []

            # The slot was abandoned, not held: another job runs (concurrency=1).
            follow_up = await next_one.enqueue()
            assert (await app.wait(follow_up.id, timeout=WAIT_S)).result == "ran"

            await worker.heartbeat_now()
            assert await leaked_in_registry(app, worker) == 1

            # Once the stubborn coroutine ends, the slot is no longer leaked.
            release.set()

            async def reclaimed() -> bool:
                return worker.leaked_slots == 0

            await wait_until(reclaimed, "the leaked coroutine to end")
            await worker.heartbeat_now()
            assert await leaked_in_registry(app, worker) == 0
            assert worker.stats.leaked == 1  # a counter of every leak, ever
            # Its late return value is not recorded.
            assert (await app.get_job(job.id)).result is None
    finally:
        release.set()  # let the coroutine end so the loop closes cleanly
        await asyncio.sleep(0.05)


async def test_async_attempt_without_timeout_ignoring_a_cancel_is_abandoned_at_the_hard_limit(
    app: App,
) -> None:
    # No timeout: the worker's cancel is the only stop. An attempt that swallows
    # it must still be left behind after cancel_hard_limit, its job recorded.
    release = asyncio.Event()
    swallowed: list[int] = []

    stubborn = _stubborn(app, release, swallowed)

    try:
        async with running_worker(app, config()) as worker:
            job = await stubborn.enqueue()
            await wait_for_state(app, job.id, "running")
            await app.cancel(job.id, reason="stop it")
            done = await app.wait(job.id, timeout=WAIT_S)
            assert done.state is JobState.CANCELLED
            assert swallowed == [1]
            assert worker.leaked_slots == 1
            assert worker.running_job_ids == []
    finally:
        release.set()
        await asyncio.sleep(0.05)


async def test_sync_attempt_ignoring_cancellation_leaks_until_its_thread_returns(
    app: App,
) -> None:
    gate = threading.Event()
    noticed: list[bool] = []

    @app.task(
        name="sync_stubborn",
        timeout=TIMEOUT_S,
        max_attempts=2,
        retry=FixedDelay(timedelta(minutes=1)),
    )
    def sync_stubborn(ctx: JobContext) -> str:
        gate.wait(20)  # ignores ctx.cancelled until the test lets it go
        noticed.append(ctx.cancelled)
        return "late"

    await freeze_time(app, FROZEN)
    try:
        async with running_worker(app, config()) as worker:
            job = await sync_stubborn.enqueue()
            retrying = await wait_for_state(app, job.id, "scheduled")
            assert retrying.run_at == FROZEN + timedelta(minutes=1)
            assert [e["type"] for e in retrying.errors] == [TIMEOUT_TYPE]
            assert worker.leaked_slots == 1
            assert worker.stats.leaked == 1
            await worker.heartbeat_now()
            assert await leaked_in_registry(app, worker) == 1

            gate.set()

            async def thread_returned() -> bool:
                return worker.leaked_slots == 0

            await wait_until(thread_returned, "the sync task's thread to return")
            assert noticed == [True]
            await worker.heartbeat_now()
            assert await leaked_in_registry(app, worker) == 0
            after = await app.get_job(job.id)
            assert (after.state, after.result, after.attempt) == ("scheduled", None, 1)
    finally:
        gate.set()


async def test_a_leaked_sync_thread_does_not_strand_the_next_claimed_job(app: App) -> None:
    """concurrency=1 and its only thread is leaked: the worker must not claim a sync job
    it has no thread to start (it would sit `running`, lease renewed, never started)."""
    gate = threading.Event()
    quick_ran = threading.Event()

    @app.task(name="hog", timeout=TIMEOUT_S, max_attempts=1)
    def hog(ctx: JobContext) -> None:
        gate.wait(20)

    @app.task(name="quick_sync")
    def quick_sync(ctx: JobContext) -> str:
        quick_ran.set()
        return "ran"

    async with running_worker(app, config()) as worker:
        try:
            leaky = await hog.enqueue()
            assert (await app.wait(leaky.id, timeout=WAIT_S)).state is JobState.FAILED
            assert worker.leaked_slots == 1

            job = await quick_sync.enqueue()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 1.5  # many poll intervals: time enough to claim it
            while loop.time() < deadline and not quick_ran.is_set():
                await asyncio.sleep(0.05)
            current = await app.get_job(job.id)
            assert quick_ran.is_set() or current.state is JobState.AVAILABLE, (
                f"job {job.id} is {current.state} but its function never started: "
                "claimed with no free thread behind a leaked one"
            )
        finally:
            gate.set()  # before the worker stops, so it does not wait out its grace
