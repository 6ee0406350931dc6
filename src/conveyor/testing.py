"""Helpers for testing code that uses conveyor (and for conveyor's own tests).

The database clock is the only clock conveyor schedules by, so tests move time
instead of sleeping:

```python
from conveyor.testing import freeze_time, advance_time

await freeze_time(app, datetime(2026, 1, 1, 9, 0, tzinfo=UTC))
job = await task.configure(delay=timedelta(hours=1)).enqueue()
await advance_time(app, timedelta(hours=1))      # the job is now due
```
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from conveyor.app import App
from conveyor.config import WorkerConfig
from conveyor.jobs import Job
from conveyor.worker.worker import Worker


async def database_now(app: App) -> datetime:
    """The time conveyor's scheduling sees (`<schema>.now()`)."""
    rows = await app.db.fetch("read clock", "clock_now")
    now: datetime = rows[0]["now"]
    return now


async def freeze_time(app: App, at: datetime | None) -> None:
    """Freeze the database clock at `at` for every connection; None resumes real time."""
    if at is not None and at.tzinfo is None:
        raise ValueError("freeze_time needs a timezone-aware datetime")
    await app.db.fetch("set clock", "clock_set", {"at": at})


async def advance_time(app: App, by: timedelta) -> datetime:
    """Move the database clock forward by `by` (freezing it there); returns the new time."""
    rows = await app.db.fetch("advance clock", "clock_advance", {"seconds": by.total_seconds()})
    moved: datetime = rows[0]["fake_now"]
    return moved


async def drain(
    app: App, config: WorkerConfig | None = None, *, timeout: float = 30.0
) -> list[Job]:
    """Run a worker until no due job is left in its queues, then stop it.

    Returns the jobs of the configured queues, in id order. Meant for tests that
    want "run everything that is due now" without managing a worker.
    """
    worker = Worker(app, config or WorkerConfig(poll_interval=timedelta(milliseconds=50)))
    await worker.start()
    try:
        async with asyncio.timeout(timeout):
            while True:
                await worker.wait_until_idle()
                if not await _has_due_jobs(app, worker.config.queues):
                    break
                await asyncio.sleep(0.02)
    finally:
        await worker.stop()
    rows = await app.db.fetch("list jobs", "job_list", {"state": None, "limit": 1_000_000})
    return sorted(
        (Job.from_row(r) for r in rows if r["queue"] in worker.config.queues), key=lambda j: j.id
    )


async def _has_due_jobs(app: App, queues: tuple[str, ...]) -> bool:
    rows = await app.db.fetch("count due jobs", "job_count_due", {"queues": list(queues)})
    return bool(rows[0]["count"])
