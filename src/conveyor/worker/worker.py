"""The worker: composition root of producer (fetch), executor (run) and completer (flush).

```python
worker = Worker(app, WorkerConfig(queues=("default",), concurrency=10))
await worker.run()          # until worker.request_stop() or SIGINT/SIGTERM via the CLI
```

One asyncio task owns the running-jobs table (`_running`); the producer adds
to it, finished attempts remove themselves and hand their outcome to the
completer. A background component that dies stops the worker loudly.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta

from conveyor.app import App
from conveyor.config import WorkerConfig
from conveyor.context import JobContext
from conveyor.db.notifier import Notifier, jobs_channel
from conveyor.jobs import Job
from conveyor.worker.buffer import BatchBuffer
from conveyor.worker.executor import execute, executor_failure
from conveyor.worker.heartbeat import Heartbeat
from conveyor.worker.outcome import Outcome
from conveyor.worker.producer import Producer

log = logging.getLogger("conveyor.worker")


@dataclass
class WorkerStats:
    """Counters of one worker's life, for logs, the CLI and tests."""

    started: int = 0
    succeeded: int = 0
    retried: int = 0
    failed: int = 0
    cancelled: int = 0
    returned: int = 0
    stale_writes: int = 0
    """Outcomes the database refused because the lease token was no longer current."""
    by_state: dict[str, int] = field(default_factory=dict)


@dataclass
class _Running:
    job: Job
    ctx: JobContext
    task: asyncio.Task[Outcome]


def new_worker_id() -> str:
    """A unique id per process incarnation: host, pid and a random part."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Worker:
    """Runs jobs of `app` from the configured queues until stopped."""

    def __init__(
        self, app: App, config: WorkerConfig | None = None, *, worker_id: str | None = None
    ) -> None:
        self.app = app
        self.config = config or WorkerConfig()
        self.id = worker_id or new_worker_id()
        self.stats = WorkerStats()
        self._running: dict[int, _Running] = {}
        self._threads = ThreadPoolExecutor(
            max_workers=self.config.sync_threads or self.config.concurrency,
            thread_name_prefix="conveyor-task",
        )
        self._completer: BatchBuffer[Outcome] = BatchBuffer(
            self._write_outcomes,
            size=self.config.flush_size,
            interval=self.config.flush_interval,
            name="completer",
        )
        self._producer = Producer(app.db, self.config, self.id, self.free_slots, self._start_job)
        self._channel = jobs_channel(app.config.schema)
        self._notifier = Notifier(app.db, self._channel, self._on_notify, self._producer.wake)
        self._heartbeat = Heartbeat(app.db, self.config, self._leases)
        self._stop_requested = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._started = False
        self._stopped = False

    # -- public ------------------------------------------------------------

    def free_slots(self) -> int:
        """Slots not taken by a running job."""
        return self.config.concurrency - len(self._running)

    @property
    def running_job_ids(self) -> list[int]:
        """Ids of the jobs this worker is running now."""
        return sorted(self._running)

    def request_stop(self) -> None:
        """Ask `run` to shut down gracefully (safe from a signal handler via the loop)."""
        self._stop_requested.set()

    async def run(self) -> None:
        """Start, work until `request_stop`, then shut down gracefully."""
        await self.start()
        try:
            await self._wait_for_stop_or_crash()
        finally:
            await self.stop()

    async def start(self) -> None:
        """Check the schema and start every component."""
        if self._started:
            return
        self._started = True
        await asyncio.to_thread(self.app.check_schema)
        if self.config.listen:
            self._notifier.start()
        self._completer.start()
        self._heartbeat.start()
        self._producer.start()
        log.info(
            "worker %s started: queues=%s concurrency=%d",
            self.id,
            ",".join(self.config.queues),
            self.config.concurrency,
        )

    async def stop(self) -> None:
        """Stop claiming, let running jobs finish within the grace period, return the
        rest to `available` (attempt refunded), flush every outcome. Idempotent."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        await self._producer.stop()
        await self._drain_running()
        await self._completer.stop()
        await self._heartbeat.stop()
        await self._notifier.stop()
        self._threads.shutdown(wait=False, cancel_futures=True)
        log.info("worker %s stopped: %s", self.id, self.stats)

    async def wait_until_idle(self) -> None:
        """Wait until no job is running and every outcome is written (for tests)."""
        while self._running or len(self._completer):
            self._idle.clear()
            await self._idle.wait()

    # -- internals ---------------------------------------------------------

    async def _wait_for_stop_or_crash(self) -> None:
        stop = asyncio.create_task(self._stop_requested.wait())
        components = [
            t
            for t in (
                self._producer.task,
                self._completer.task,
                self._heartbeat.task,
                self._notifier.task,
            )
            if t is not None
        ]
        done, _ = await asyncio.wait([stop, *components], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        for finished in done:
            if finished is not stop:
                exc = finished.exception() if not finished.cancelled() else None
                log.error("worker %s: component %s died: %r", self.id, finished.get_name(), exc)
                raise RuntimeError(f"worker component {finished.get_name()} died") from exc

    def _on_notify(self, queue: str) -> None:
        if queue in self.config.queues:
            self._producer.wake()

    def _start_job(self, job: Job) -> None:
        task_def = self.app.tasks.get(job.task)
        ctx = JobContext(app=self.app, job=job, worker_id=self.id)
        runner = asyncio.create_task(
            execute(job, task_def, ctx, self._threads), name=f"conveyor-job-{job.id}"
        )
        self._running[job.id] = _Running(job, ctx, runner)
        self._idle.clear()
        self.stats.started += 1
        runner.add_done_callback(functools.partial(self._finished, job.id))

    def _finished(self, job_id: int, runner: asyncio.Task[Outcome]) -> None:
        entry = self._running.pop(job_id)
        token = entry.job.lease_token
        assert token is not None
        if runner.cancelled():
            # Cancelled before its first step ran: it never started, give it back.
            outcome = Outcome.retry(job_id, token, timedelta(0), None, refund=True)
        elif (exc := runner.exception()) is not None:
            log.error("job %s: executor error %r", job_id, exc)
            outcome = executor_failure(entry.job, token, exc)
        else:
            outcome = runner.result()
        self._count(outcome)
        self._completer.add(outcome)
        self._producer.slot_freed()

    def _count(self, outcome: Outcome) -> None:
        stats = self.stats
        if outcome.state == "succeeded":
            stats.succeeded += 1
        elif outcome.state == "failed":
            stats.failed += 1
        elif outcome.state == "cancelled":
            stats.cancelled += 1
        elif outcome.refund and outcome.error is None and outcome.retry_in_s == 0:
            stats.returned += 1
        else:
            stats.retried += 1

    async def _write_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        rows = await self.app.db.fetch(
            "record job outcomes",
            "job_finish_many",
            {
                "id": [o.job_id for o in outcomes],
                "token": [o.token for o in outcomes],
                "state": [o.state for o in outcomes],
                "result": [o.result for o in outcomes],
                "error": [o.error for o in outcomes],
                "retry_in_s": [o.retry_in_s for o in outcomes],
                "refund": [o.refund for o in outcomes],
                "channel": self._channel,
            },
        )
        stale = len(outcomes) - len(rows)
        if stale:
            self.stats.stale_writes += stale
            log.warning(
                "worker %s: %d outcome(s) refused: lease token no longer current", self.id, stale
            )
        if not self._running and len(self._completer) == 0:
            self._idle.set()

    def _leases(self) -> list[tuple[int, int]]:
        held = [(r.job.id, r.job.lease_token) for r in self._running.values()]
        held += [(o.job_id, o.token) for o in self._completer.pending]
        return [(job_id, token) for job_id, token in held if token is not None]

    async def _drain_running(self) -> None:
        if not self._running:
            return
        grace = self.config.shutdown_grace.total_seconds()
        tasks = [r.task for r in self._running.values()]
        log.info("worker %s: waiting up to %.1fs for %d running job(s)", self.id, grace, len(tasks))
        _, late = await asyncio.wait(tasks, timeout=grace)
        for entry in self._running.values():
            if entry.task in late:
                entry.ctx.request_stop("shutdown")
                entry.task.cancel()
        if late:
            log.warning(
                "worker %s: returning %d job(s) still running after the grace period",
                self.id,
                len(late),
            )
            await asyncio.wait(late)
