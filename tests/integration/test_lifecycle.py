"""The core job lifecycle, end to end through a real worker."""

from __future__ import annotations

from datetime import timedelta

from conveyor import App, JobState, Worker, WorkerConfig
from conveyor.testing import drain


async def test_readme_example(app: App) -> None:
    @app.task(queue="default", max_attempts=3)
    async def add(ctx: object, a: int, b: int) -> int:
        return a + b

    worker = Worker(app, WorkerConfig(poll_interval=timedelta(milliseconds=100)))
    await worker.start()
    try:
        job = await add.enqueue(a=1, b=2)
        done = await app.wait(job.id, timeout=10)
    finally:
        await worker.stop()
    assert done.state == "succeeded"
    assert done.state is JobState.SUCCEEDED
    assert done.result == 3
    assert done.attempt == 1


async def test_sync_task_runs_in_thread(app: App) -> None:
    import threading

    main = threading.get_ident()

    @app.task
    def where(ctx: object) -> bool:
        return threading.get_ident() != main

    job = await where.enqueue()
    jobs = await drain(app)
    assert [j.id for j in jobs] == [job.id]
    assert jobs[0].result is True
