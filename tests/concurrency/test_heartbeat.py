"""The heartbeat renews the lease of a running job, measured on the database's fake clock."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from conveyor import App, JobContext, Worker, WorkerConfig
from conveyor.testing import advance_time, database_now, freeze_time
from tests.concurrency.procs import wait_until

LEASE = timedelta(seconds=30)
RUN_TIMEOUT_S = 30.0


async def test_heartbeat_extends_the_lease_to_database_now_plus_lease_duration(
    app: App,
) -> None:
    release = asyncio.Event()

    @app.task(name="blocked")
    async def blocked(ctx: JobContext) -> str:
        await release.wait()
        return "done"

    await freeze_time(app, datetime(2030, 6, 1, 12, 0, tzinfo=UTC))
    frozen = await database_now(app)
    worker = Worker(
        app,
        WorkerConfig(
            concurrency=2,
            lease_duration=LEASE,
            # The test beats by hand; the background beat would only repeat it.
            heartbeat_interval=timedelta(seconds=29),
            poll_interval=timedelta(milliseconds=50),
        ),
    )
    await worker.start()
    try:
        job = await blocked.enqueue()

        async def running() -> bool:
            return (await app.get_job(job.id)).state == "running"

        await wait_until(running, RUN_TIMEOUT_S, "job running")
        claimed = await app.get_job(job.id)
        assert claimed.lease_expires_at == frozen + LEASE

        for step in (timedelta(seconds=20), timedelta(seconds=25)):
            now = await advance_time(app, step)
            assert (await worker.heartbeat_now()).renewed == {job.id}
            beaten = await app.get_job(job.id)
            assert beaten.lease_expires_at == now + LEASE
            assert (beaten.state, beaten.lease_token) == ("running", claimed.lease_token)

        release.set()
        done = await app.wait(job.id, timeout=RUN_TIMEOUT_S)
        assert (done.state, done.result, done.lease_expires_at) == ("succeeded", "done", None)
        # Nothing held any more: a beat renews nothing.
        await worker.wait_until_idle()
        assert (await worker.heartbeat_now()).renewed == frozenset()
    finally:
        release.set()
        await worker.stop()
