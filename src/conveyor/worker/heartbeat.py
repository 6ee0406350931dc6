"""The heartbeat: renew the leases of every job this worker holds, in one statement."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from conveyor.config import WorkerConfig
from conveyor.db.database import Database

log = logging.getLogger("conveyor.worker")


class Heartbeat:
    """Every `heartbeat_interval`, extends the leases returned by `leases()`."""

    def __init__(
        self, db: Database, config: WorkerConfig, leases: Callable[[], list[tuple[int, int]]]
    ) -> None:
        self._db = db
        self._config = config
        self._leases = leases
        self._task: asyncio.Task[None] | None = None
        self.beats = 0

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The heartbeat task, for the worker to supervise."""
        return self._task

    def start(self) -> None:
        """Start beating in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="conveyor-heartbeat")

    async def stop(self) -> None:
        """Stop beating; a second call is a no-op."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def beat(self) -> int:
        """Extend the leases now; returns how many the database renewed."""
        held = self._leases()
        if not held:
            return 0
        rows = await self._db.fetch(
            "extend leases",
            "lease_extend_many",
            {
                "id": [job_id for job_id, _ in held],
                "token": [token for _, token in held],
                "lease_s": self._config.lease_duration.total_seconds(),
            },
        )
        self.beats += 1
        return len(rows)

    async def _run(self) -> None:
        interval = self._config.heartbeat_interval.total_seconds()
        while True:
            await asyncio.sleep(interval)
            try:
                await self.beat()
            except Exception as exc:
                # A missed beat is survivable: the lease outlives several intervals.
                log.warning("heartbeat failed: %s", exc)
