"""A job claimed again by the same worker while its abandoned attempt still stops."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta

from conveyor import App, JobContext, Worker, WorkerConfig
from conveyor.jobs import Job, JobState

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _claimed(token: int) -> Job:
    return Job(
        id=7,
        queue="default",
        task="slow",
        args={},
        state=JobState.RUNNING,
        priority=0,
        attempt=token,
        max_attempts=5,
        run_at=T0,
        created_at=T0,
        lease_token=token,
    )


async def test_the_old_attempt_ending_does_not_untrack_the_new_one() -> None:
    app = App("postgresql://unused@127.0.0.1:1/none")
    release_old = threading.Event()
    release_new = threading.Event()

    @app.task(name="slow")
    def slow(ctx: JobContext) -> str:
        (release_old if ctx.job.lease_token == 1 else release_new).wait(10)
        return "done"

    worker = Worker(app, WorkerConfig(concurrency=10, cancel_hard_limit=timedelta(seconds=5)))
    loop = asyncio.get_running_loop()
    worker._start_job(_claimed(1), loop.time())
    await asyncio.sleep(0.05)
    worker._abandon(7, "lease_lost")
    worker._start_job(_claimed(2), loop.time())
    assert worker.free_slots() == 8  # both attempts hold a slot

    release_old.set()
    async with asyncio.timeout(5):
        while worker.free_slots() != 9:
            await asyncio.sleep(0.01)
    assert worker.running_job_ids == [7]
    assert worker._running[7].job.lease_token == 2

    release_new.set()
    async with asyncio.timeout(5):
        while worker.running_job_ids:
            await asyncio.sleep(0.01)
    outcomes = list(worker._completer.pending)
    assert [(o.job_id, o.token, o.state) for o in outcomes] == [(7, 2, "succeeded")]
    assert worker.stats.lease_lost == 1
    worker._threads.shutdown(wait=True)
