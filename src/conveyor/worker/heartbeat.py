"""The heartbeat: one statement renews this worker's leases and refreshes its row.

It runs on the control session's connection (see `db/control.py`) so job work
can never starve it, and it reads back the remote signals: a stop request, and
which of this worker's jobs someone asked to cancel. A job it held whose lease
did not renew has been taken away (rescued, or finished elsewhere): the worker
must abandon that attempt.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from conveyor.config import WorkerConfig
from conveyor.db.database import Database


@dataclass(frozen=True)
class HeldLease:
    """A lease the worker believes it holds."""

    job_id: int
    token: int


@dataclass(frozen=True)
class HeartbeatReply:
    """What one beat learned."""

    renewed: frozenset[int]
    lost: frozenset[HeldLease]
    """Leases (job id and token) the database did not renew."""
    cancel_requested: frozenset[int]
    stop_requested: bool
    registered: bool
    """False if the worker row is gone (pruned): the worker re-registers."""


@dataclass(frozen=True)
class WorkerReport:
    """The worker's numbers written with each beat."""

    running_jobs: int
    leaked_slots: int
    stats: dict[str, Any]
    state: str = "running"
    """running, or stopping once shutdown began."""


class Heartbeat:
    """Builds and runs the heartbeat statement for one worker."""

    def __init__(
        self,
        db: Database,
        config: WorkerConfig,
        worker_id: str,
        held: Callable[[], Sequence[HeldLease]],
        report: Callable[[], WorkerReport],
    ) -> None:
        self._db = db
        self._config = config
        self._worker_id = worker_id
        self._held = held
        self._report = report
        self.beats = 0

    async def beat(self, conn: psycopg.AsyncConnection[Any] | None = None) -> HeartbeatReply:
        """Renew every held lease now (on `conn`, else a pooled connection)."""
        held = list(self._held())
        report = self._report()
        params = {
            "job_id": [lease.job_id for lease in held],
            "token": [lease.token for lease in held],
            "lease_s": self._config.lease_duration.total_seconds(),
            "worker_id": self._worker_id,
            "own_state": report.state,
            "running_jobs": report.running_jobs,
            "leaked_slots": report.leaked_slots,
            "stats": json.dumps(report.stats),
        }
        rows = await self._db.fetch("heartbeat", "worker_heartbeat", params, conn=conn)
        self.beats += 1
        row = rows[0]
        renewed = frozenset(int(i) for i in row["renewed"])
        busy = frozenset(int(i) for i in row["busy"])
        return HeartbeatReply(
            renewed=renewed,
            lost=frozenset(lease for lease in held if lease.job_id not in renewed | busy),
            cancel_requested=frozenset(int(i) for i in row["cancel"]),
            stop_requested=bool(row["stop_requested"]),
            registered=bool(row["registered"]),
        )
