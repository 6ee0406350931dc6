"""The rescuer: jobs whose lease expired go back to the queue, fenced.

Every worker runs one; an advisory lock lets only one of them work at a time.
A pass reads the expired leases, then rescues them with a statement that
re-checks state, token and expiry, so a job that completed (or was renewed)
between the read and the write is left alone. Rescues count as attempts: a
poison job that kills every worker it lands on ends `failed` after
`max_attempts`. Workers silent for longer than `dead_after` are marked dead.
The same pass folds queue statistics and starts any keyed pipeline run left
waiting with no run of its key running (a safety net; see run_promote_stranded).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg

from conveyor.db.control import control_channel, jobs_channel
from conveyor.db.database import Database, Row
from conveyor.locks.advisory import xact_lock
from conveyor.maintenance.pruner import prune
from conveyor.service import BackgroundService

log = logging.getLogger("conveyor.rescuer")

RESCUE_BATCH = 1_000
RESCUE_BACKOFF_BASE = timedelta(seconds=1)
"""First rescue waits 1 s, then 2, 4, ... so a crash loop does not spin."""
RESCUE_BACKOFF_MAX = timedelta(minutes=5)


@dataclass(frozen=True)
class RescueReport:
    """What one pass did."""

    ran: bool
    """False when another worker held the rescuer lock."""
    rescued: dict[int, str] = field(default_factory=dict)
    """Job id -> the state it was moved to (available, scheduled, failed, cancelled)."""
    skipped: int = 0
    """Candidates that changed between read and write (completed, renewed)."""
    dead_workers: list[str] = field(default_factory=list)
    pruned: int = 0
    """Finished jobs deleted by the retention settings."""


class Rescuer(BackgroundService):
    """Runs `run_once` every `interval`."""

    name = "rescuer"

    def __init__(
        self,
        db: Database,
        *,
        interval: timedelta,
        dead_after: timedelta,
        backoff_base: timedelta = RESCUE_BACKOFF_BASE,
        backoff_max: timedelta = RESCUE_BACKOFF_MAX,
        retention: Mapping[str, timedelta] | None = None,
    ) -> None:
        super().__init__()
        self._db = db
        self._interval = interval
        self._dead_after = dead_after
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._retention = dict(retention or {})
        self._lock_key = f"conveyor.rescuer:{db.schema}"
        self.between_read_and_write: Callable[[], Awaitable[None]] | None = None
        """Test hook: awaited after the read, before the fenced write."""

    async def run_once(self) -> RescueReport:
        """One rescue pass; returns what it did."""
        async with self._db.connection() as conn, conn.transaction():
            if not await xact_lock(self._db, conn, self._lock_key, timeout=0):
                return RescueReport(ran=False)
            dead = await self._db.fetch(
                "mark dead workers",
                "worker_mark_dead",
                {"dead_after_s": self._dead_after.total_seconds()},
                conn=conn,
            )
            candidates = await self._db.fetch(
                "find expired leases", "job_rescue_candidates", {"limit": RESCUE_BATCH}, conn=conn
            )
            if self.between_read_and_write is not None:
                await self.between_read_and_write()
            rescued = await self._rescue(conn, candidates) if candidates else {}
            await self._db.fetch(
                "reschedule jobs outside their window",
                "job_reschedule_closed_windows",
                conn=conn,
            )
            await self._db.fetch("fold queue statistics", "queue_stats_compact", conn=conn)
            await self._db.fetch(
                "start stranded runs",
                "run_promote_stranded",
                {"channel": control_channel(self._db.schema)},
                conn=conn,
            )
        pruned = 0
        for state, age in self._retention.items():
            # After the rescue transaction: pruning runs in batches of its own.
            pruned += (await prune(self._db, older_than=age, states=[state])).jobs
        report = RescueReport(
            ran=True,
            pruned=pruned,
            rescued=rescued,
            skipped=len(candidates) - len(rescued),
            dead_workers=[r["id"] for r in dead],
        )
        if rescued or report.dead_workers:
            log.warning(
                "rescued %d job(s) %s; dead workers: %s",
                len(rescued),
                rescued,
                report.dead_workers or "none",
            )
        return report

    async def _rescue(
        self, conn: psycopg.AsyncConnection[Any], candidates: list[Row]
    ) -> dict[int, str]:
        rows = await self._db.fetch(
            "rescue expired jobs",
            "job_rescue_many",
            {
                "id": [c["id"] for c in candidates],
                "token": [c["lease_token"] for c in candidates],
                "backoff_base_s": self._backoff_base.total_seconds(),
                "backoff_max_s": self._backoff_max.total_seconds(),
                "channel": jobs_channel(self._db.schema),
            },
            conn=conn,
        )
        return {int(r["id"]): str(r["state"]) for r in rows}

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception as exc:
                log.warning("rescue pass failed: %s", exc)
            await asyncio.sleep(self._interval.total_seconds())
