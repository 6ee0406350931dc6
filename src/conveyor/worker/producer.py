"""The producer: claims jobs when slots are free, woken by NOTIFY or a poll timer.

It claims at most as many jobs as there are free slots, in one statement, so
a worker never holds a job it cannot start. A claim that returns fewer jobs
than it asked for, or all it asked for but nothing more to find (the claim's
`more` is false), means the queue (or its keys) is drained for now: the
producer then sleeps until a notification, its own outcomes are written, a
catch-up request or the poll interval.

While it claims back to back it keeps one pooled connection for its claims
(if the pool has two more for everything else), and gives it back when it
waits for work. Borrowing and returning a connection per claim was a tenth
of a short claim's round trip, and that round trip is what bounds a worker
at low concurrency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from datetime import datetime

import psycopg

from conveyor.config import WorkerConfig
from conveyor.db.control import jobs_channel
from conveyor.db.database import Database, Row, retry_delay
from conveyor.errors import DatabaseError
from conveyor.jobs import Job
from conveyor.service import BackgroundService

log = logging.getLogger("conveyor.worker")

HOLD_MIN_POOL_SIZE = 3
"""The producer keeps a connection for its claims only if the pool is at least
this big: outcome writes, heartbeats and the tasks' own queries keep the rest."""


class Producer(BackgroundService):
    """Claims jobs for one worker and hands them to `start_job`."""

    name = "producer"

    def __init__(
        self,
        db: Database,
        config: WorkerConfig,
        worker_id: str,
        free_slots: Callable[[], int],
        start_job: Callable[[Job, float], None],
        held_ids: Callable[[], list[int]],
        on_starved: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self._db = db
        self._config = config
        self._worker_id = worker_id
        self._free_slots = free_slots
        self._start_job = start_job
        self._held_ids = held_ids
        self._on_starved = on_starved
        self.starved = False
        """True while the last claim came back short: free slots wait for work,
        which may be only a key at its limit until this worker's outcomes land."""
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._stopping = False
        self._claim_conn: psycopg.AsyncConnection[Row] | None = None
        self._may_hold = db.config.pool_size >= HOLD_MIN_POOL_SIZE
        self.claims = 0

    def wake(self) -> None:
        """Something may be waiting: claim at the next chance."""
        self._wake.set()

    def slot_freed(self) -> None:
        """A running job finished: a slot is free."""
        self._slot_freed.set()

    async def stop(self) -> None:
        """Stop claiming; an in-flight claim completes and its jobs start. Idempotent."""
        self._stopping = True
        self._wake.set()
        self._slot_freed.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        try:
            await self._produce()
        finally:
            await self._let_go()

    async def _produce(self) -> None:
        queue_may_have_jobs = True
        failures = 0
        poll = self._config.poll_interval.total_seconds()
        while not self._stopping:
            free = self._free_slots()
            if free <= 0:
                await self._slot_freed.wait()
                self._slot_freed.clear()
                continue
            if not queue_may_have_jobs:
                await self._let_go()  # waiting for work: the pool gets it back
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), poll)
                if self._stopping:
                    return
            self._wake.clear()
            # Taken before the claim is sent: the lease may start as early as this.
            claimed_at = asyncio.get_running_loop().time()
            try:
                jobs, more = await self._claim(free)
            except DatabaseError as exc:
                delay = retry_delay(min(failures, 6))
                failures += 1
                log.warning("claim failed (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                await self._release_unheld()
                continue
            failures = 0
            for job in jobs:
                self._start_job(job, claimed_at)
            # A short claim found less claimable work than it asked for, and a full
            # one may have taken all there was (`more` is false): the queue is
            # drained, or its keys are at their limits, for now. Claiming again
            # at once would come back empty (for a busy key, every time a job of
            # it ends); the next claim waits for a wake-up instead: a NOTIFY, this
            # worker's own outcomes written (which may free room in a key), or the
            # poll. Rows skipped because other claimers held them locked (SKIP
            # LOCKED) are all but gone by then: a claim walks past locked rows,
            # so it only comes back short near the end of the backlog.
            queue_may_have_jobs = len(jobs) == free and more
            if self.starved != (not queue_may_have_jobs):
                self.starved = not queue_may_have_jobs
                if self.starved and self._on_starved is not None:
                    self._on_starved()

    async def _let_go(self) -> None:
        """Give the claims' connection back to the pool, if one is kept."""
        conn, self._claim_conn = self._claim_conn, None
        if conn is not None:
            await self._db.release(conn)

    async def _release_unheld(self) -> None:
        """A failed claim may still have committed: hand back what we do not hold."""
        try:
            rows = await self._db.fetch(
                "release unheld claims",
                "job_release_unheld",
                {
                    "worker_id": self._worker_id,
                    "held": self._held_ids(),
                    "channel": jobs_channel(self._db.schema),
                },
            )
        except DatabaseError as exc:
            # Still unreachable: the leases expire and the rescuer takes them back.
            log.warning("could not release unheld claims: %s", exc)
            return
        if rows:
            log.warning("released %d job(s) claimed by a lost claim", len(rows))

    async def _claim(self, limit: int) -> tuple[Sequence[Job], bool]:
        """The jobs claimed, and whether claiming again at once could find more."""
        params = {
            "queues": list(self._config.queues),
            "limit": limit,
            "worker_id": self._worker_id,
            "lease_s": self._config.lease_duration.total_seconds(),
        }
        if self._may_hold:
            if self._claim_conn is None:
                self._claim_conn = await self._db.hold("claim jobs")
            conn = self._claim_conn
            try:
                # Never re-sent (a statement on a given connection is not retried).
                rows = await self._db.fetch("claim jobs", "job_claim_many", params, conn=conn)
            except DatabaseError:
                await self._let_go()  # perhaps broken: the pool checks it
                raise
        else:
            # Not idempotent: re-sending a claim whose reply was lost would strand the
            # first claim's jobs; the caller releases them instead (_release_unheld).
            rows = await self._db.fetch("claim jobs", "job_claim_many", params, idempotent=False)
        self.claims += 1
        return claim_order([Job.from_row(r) for r in rows]), bool(rows) and rows[0]["more"]


def claim_order(jobs: list[Job]) -> list[Job]:
    """The order to start a claimed batch in: the claim statement's own order.

    Unkeyed jobs by priority, run time, id; a key's jobs as a block behind its
    head (the key's smallest id), in id order, so a batch never starts a later
    job of a key before an earlier one.
    """
    heads: dict[tuple[str, str], Job] = {}
    for job in sorted(jobs, key=lambda j: j.id):
        if job.concurrency_key is not None:
            heads.setdefault((job.queue, job.concurrency_key), job)

    def position(job: Job) -> tuple[int, datetime, int, int]:
        if job.concurrency_key is None:
            return (-job.priority, job.run_at, job.id, 0)
        head = heads[(job.queue, job.concurrency_key)]
        return (-head.priority, head.run_at, head.id, job.id)

    return sorted(jobs, key=position)
