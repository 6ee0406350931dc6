"""The worker: composition root of fetch (producer), run (executor) and flush (completer).

```python
worker = Worker(app, WorkerConfig(queues=("default",), concurrency=10))
await worker.run()          # until worker.request_stop(), a remote stop, or SIGINT/SIGTERM
```

One asyncio task owns the running-jobs table (`_running`): the producer adds
to it, finished attempts remove themselves and hand their outcome to the
completer. Around it: the control session (LISTEN + heartbeat on a dedicated
connection), the lease watchdog (local, no database), and the rescuer. A
background component that dies stops the worker loudly.

A lease is the worker's right to record a job. It is lost when a heartbeat
does not renew it (the rescuer took the job back) or when no renewal has
succeeded for `lease_duration` on this process's monotonic clock (the
database is unreachable, so the rescuer may already have taken it). Either
way the worker abandons the attempt and records nothing for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import socket
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg

from conveyor.app import App
from conveyor.config import WorkerConfig
from conveyor.context import JobContext, StopReason
from conveyor.db.columns import columns
from conveyor.db.control import ControlSession, control_channel, jobs_channel
from conveyor.event_loop import loop_name
from conveyor.jobs import Job
from conveyor.maintenance.rescuer import Rescuer
from conveyor.migrations.migrator import latest_version
from conveyor.worker.buffer import BatchBuffer
from conveyor.worker.echoes import Echoes
from conveyor.worker.executor import execute, executor_failure
from conveyor.worker.heartbeat import Heartbeat, HeartbeatReply, HeldLease, WorkerReport
from conveyor.worker.outcome import Outcome
from conveyor.worker.producer import Producer

log = logging.getLogger("conveyor.worker")

WATCHDOG_PERIOD_S = 0.5
ABANDONED_MEMORY = 10_000
"""Lease-lost jobs remembered so a claim release never refunds them; far more than
a worker abandons between two rescues."""


@dataclass
class WorkerStats:
    """Counters of one worker's life, for logs, the registry, the CLI and tests."""

    started: int = 0
    succeeded: int = 0
    retried: int = 0
    failed: int = 0
    cancelled: int = 0
    returned: int = 0
    """Handed back at shutdown, attempt refunded."""
    lease_lost: int = 0
    """Attempts abandoned because the lease was lost; nothing recorded for them."""
    stale_writes: int = 0
    """Outcomes the database refused because the lease token was no longer current."""
    leaked: int = 0
    """Attempts that ignored cancellation past the hard limit (ever)."""


@dataclass
class _Running:
    job: Job
    ctx: JobContext
    task: asyncio.Task[Outcome | None]
    lease_deadline: float
    """Monotonic time after which the lease may have expired without us knowing."""


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
        self._leaked: set[asyncio.Future[Any]] = set()
        self._leaked_threads: set[asyncio.Future[Any]] = set()
        self._superseded: dict[asyncio.Task[Outcome | None], _Running] = {}
        """Abandoned attempts still stopping whose job this worker claimed again."""
        self._abandoned: dict[int, None] = {}
        """Jobs abandoned after a lost lease (insertion-ordered, bounded)."""
        self._threads = ThreadPoolExecutor(
            max_workers=self.config.sync_threads or self.config.concurrency,
            thread_name_prefix="conveyor-task",
        )
        schema = app.config.schema
        self._jobs_channel = jobs_channel(schema)
        self._completer: BatchBuffer[Outcome] = BatchBuffer(
            self._write_outcomes,
            size=self.config.flush_size,
            interval=self.config.flush_interval,
            name="completer",
            on_written=self._after_write,
        )
        self._echoes = Echoes()
        self._producer = Producer(
            app.db,
            self.config,
            self.id,
            self.free_slots,
            self._start_job,
            self._held_ids,
            on_starved=self._completer.hurry,
        )
        self._heartbeat = Heartbeat(app.db, self.config, self.id, self._held, self._report)
        self._control = ControlSession(
            app.db,
            channels={self._jobs_channel: self._on_jobs, control_channel(schema): self._on_control},
            on_reconnect=self._reconnected,
            on_tick=self._beat,
            tick_s=self.config.heartbeat_interval.total_seconds(),
            listen=self.config.listen,
        )
        self._rescuer = Rescuer(
            app.db,
            interval=self.config.rescue_interval,
            dead_after=self.config.dead_after,
            retention=self.config.retention,
        )
        self._watchdog: asyncio.Task[None] | None = None
        self._stop_requested = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._started = False
        self._stopped = False

    # -- public ------------------------------------------------------------

    def free_slots(self) -> int:
        """Slots not taken by a running job or by a leaked sync thread.

        A leaked async attempt frees its slot (it only costs memory), but a
        leaked thread still occupies one of the pool's `concurrency` threads: a
        job claimed for it could not start.
        """
        busy = len(self._running) + len(self._superseded) + len(self._leaked_threads)
        return self.config.concurrency - busy

    @property
    def running_job_ids(self) -> list[int]:
        """Ids of the jobs this worker is running now."""
        return sorted(self._running)

    @property
    def leaked_slots(self) -> int:
        """Abandoned attempts that are still running (ignored cancellation)."""
        return len(self._leaked)

    @property
    def claims(self) -> int:
        """Claim statements sent so far."""
        return self._producer.claims

    @property
    def connected(self) -> asyncio.Event:
        """Set while the control session is connected (listening, when it listens)."""
        return self._control.connected

    @property
    def control_connection(self) -> psycopg.AsyncConnection[Any] | None:
        """The control session's connection (for fault-injection tests)."""
        return self._control.connection

    @property
    def rescuer(self) -> Rescuer:
        """This worker's rescuer (tests call `run_once` directly)."""
        return self._rescuer

    def request_stop(self) -> None:
        """Ask `run` to shut down gracefully (call it from the loop's thread)."""
        self._stop_requested.set()

    async def run(self) -> None:
        """Start, work until a stop is requested, then shut down gracefully."""
        await self.start()
        try:
            await self._wait_for_stop_or_crash()
        finally:
            await self.stop()

    async def start(self) -> None:
        """Check the schema, create the partitions its tasks ask for, register, and
        start every component."""
        if self._started:
            return
        self._started = True
        await asyncio.to_thread(self.app.check_schema)
        await self.app.partitions.sync()
        await self._register()
        self._control.start()
        self._completer.start()
        self._producer.start()
        self._watchdog = asyncio.create_task(self._watch_leases(), name="conveyor-watchdog")
        if self.config.run_rescuer:
            self._rescuer.start()
        log.info(
            "worker %s started: queues=%s concurrency=%d loop=%s",
            self.id,
            ",".join(self.config.queues),
            self.config.concurrency,
            loop_name(),
        )

    async def stop(self) -> None:
        """Stop claiming, let running jobs finish within the grace period, return the
        rest to `available` (attempt refunded), flush every outcome. Idempotent."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        await self._set_state("stopping")
        await self._producer.stop()
        await self._rescuer.stop()
        await self._drain_running()
        await self._completer.stop()
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        await self._control.stop()
        await self._set_state("stopped")
        self._threads.shutdown(wait=False, cancel_futures=True)
        log.info("worker %s stopped: %s", self.id, self.stats)

    async def wait_until_idle(self) -> None:
        """Wait until no job is running and every outcome is written (for tests)."""
        while self._running or len(self._completer):
            self._idle.clear()
            await self._idle.wait()

    async def heartbeat_now(self) -> HeartbeatReply:
        """Beat once now, on a pooled connection, and act on the reply."""
        return await self._beat(None)

    # -- lifecycle helpers ---------------------------------------------------

    async def _register(self) -> None:
        from conveyor import __version__

        await self.app.db.fetch(
            "register worker",
            "worker_register",
            {
                "id": self.id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "version": __version__,
                "schema_version": latest_version(),
                "queues": list(self.config.queues),
                "concurrency": self.config.concurrency,
                "state": self._report().state,
                "stats": json.dumps(self._report().stats),
            },
        )

    async def _set_state(self, state: str) -> None:
        report = self._report()
        try:
            await self.app.db.fetch(
                f"mark worker {state}",
                "worker_set_state",
                {
                    "worker_id": self.id,
                    "state": state,
                    "running_jobs": report.running_jobs,
                    "leaked_slots": report.leaked_slots,
                    "stats": json.dumps(report.stats),
                },
            )
        except Exception as exc:
            # Bookkeeping only: the registry heals itself (dead_after), jobs are unaffected.
            log.warning("worker %s: could not record state %s: %s", self.id, state, exc)

    async def _wait_for_stop_or_crash(self) -> None:
        stop = asyncio.create_task(self._stop_requested.wait())
        components = [
            t
            for t in (
                self._producer.task,
                self._completer.task,
                self._control.task,
                self._rescuer.task,
                self._watchdog,
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

    # -- signals ---------------------------------------------------------------

    def _reconnected(self) -> None:
        # Notifications sent while no connection listened are lost: claim now.
        self._echoes.forget()
        self._producer.wake()

    def _on_jobs(self, queue: str, pid: int) -> None:
        if queue not in self.config.queues:
            return
        if self._echoes.heard(pid, queue, asyncio.get_running_loop().time()):
            return
        self._producer.wake()

    def _on_control(self, payload: str, pid: int) -> None:
        try:
            message = json.loads(payload)
        except json.JSONDecodeError:
            log.warning("ignoring malformed control message %r", payload)
            return
        kind = message.get("kind")
        if kind == "cancel" and message.get("job_id") in self._running:
            self._abandon(int(message["job_id"]), "cancel")
        elif kind == "stop" and message.get("worker_id") == self.id:
            log.info("worker %s: remote stop requested", self.id)
            self.request_stop()

    async def _beat(self, conn: psycopg.AsyncConnection[Any] | None) -> HeartbeatReply:
        sent_at = asyncio.get_running_loop().time()
        reply = await self._heartbeat.beat(conn)
        deadline = sent_at + self.config.lease_duration.total_seconds()
        for job_id in reply.renewed:
            if (entry := self._running.get(job_id)) is not None:
                entry.lease_deadline = deadline
        for lease in reply.lost:
            entry = self._running.get(lease.job_id)
            # Only the attempt that held that token: the job may be ours again since.
            if entry is not None and entry.job.lease_token == lease.token:
                log.warning("worker %s: lease of job %s was taken back", self.id, lease.job_id)
                self._abandon(lease.job_id, "lease_lost")
        for job_id in reply.cancel_requested:
            if job_id in self._running:
                self._abandon(job_id, "cancel")
        if reply.stop_requested and not self._stop_requested.is_set():
            log.info("worker %s: remote stop requested", self.id)
            self.request_stop()
        if not reply.registered:
            await self._register()
        return reply

    async def _watch_leases(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(WATCHDOG_PERIOD_S)
            now = loop.time()
            for job_id in [i for i, r in self._running.items() if r.lease_deadline < now]:
                log.warning(
                    "worker %s: no lease renewal for job %s within %s; abandoning it",
                    self.id,
                    job_id,
                    self.config.lease_duration,
                )
                self._abandon(job_id, "lease_lost")

    def _abandon(self, job_id: int, reason: StopReason) -> None:
        entry = self._running.get(job_id)
        if entry is None or entry.ctx.stop_reason is not None:
            return
        if reason == "lease_lost":
            self._abandoned[job_id] = None
            while len(self._abandoned) > ABANDONED_MEMORY:
                del self._abandoned[next(iter(self._abandoned))]
        entry.ctx.request_stop(reason)
        entry.task.cancel()

    # -- jobs ----------------------------------------------------------------

    def _start_job(self, job: Job, claimed_at: float) -> None:
        task_def = self.app.tasks.get(job.task)
        ctx = JobContext(app=self.app, job=job, worker_id=self.id)
        runner = asyncio.create_task(
            execute(
                job,
                task_def,
                ctx,
                self._threads,
                hard_limit=self.config.cancel_hard_limit,
                on_leak=self._on_leak,
            ),
            name=f"conveyor-job-{job.id}",
        )
        deadline = claimed_at + self.config.lease_duration.total_seconds()
        if (previous := self._running.get(job.id)) is not None:
            # The old attempt lost its lease and is still stopping; it must not be
            # mistaken for this one when it ends.
            self._superseded[previous.task] = previous
        self._running[job.id] = _Running(job, ctx, runner, deadline)
        self._idle.clear()
        self.stats.started += 1
        runner.add_done_callback(functools.partial(self._finished, job.id))

    def _on_leak(self, attempt: asyncio.Future[Any], in_thread: bool) -> None:
        self.stats.leaked += 1
        self._leaked.add(attempt)
        attempt.add_done_callback(self._leaked.discard)
        if in_thread:
            self._leaked_threads.add(attempt)
            attempt.add_done_callback(self._leaked_threads.discard)
            attempt.add_done_callback(lambda _: self._producer.slot_freed())

    def _finished(self, job_id: int, runner: asyncio.Task[Outcome | None]) -> None:
        superseded = self._superseded.pop(runner, None)
        entry = superseded if superseded is not None else self._running.pop(job_id)
        token = entry.job.lease_token
        assert token is not None
        outcome: Outcome | None
        if runner.cancelled():
            # Cancelled before its first step ran: it never started.
            outcome = (
                None
                if entry.ctx.stop_reason == "lease_lost"
                else Outcome.retry(job_id, token, timedelta(0), None, refund=True)
            )
        elif (exc := runner.exception()) is not None:
            log.error("job %s: executor error %r", job_id, exc)
            outcome = executor_failure(entry.job, token, exc)
        else:
            outcome = runner.result()
        if outcome is None:
            self.stats.lease_lost += 1
        else:
            self._count(outcome)
            # A keyed job's slot in its key frees only when its outcome commits.
            # While claims come back short that room may be all the work there is,
            # and waiting the flush interval would throttle the key to
            # limit/interval: write at once. While claims come back full, batch.
            self._completer.add(
                outcome, urgent=entry.job.concurrency_key is not None and self._producer.starved
            )
        self._producer.slot_freed()
        if not self._running and len(self._completer) == 0:
            self._idle.set()

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
        params = {
            **columns(
                outcomes, "token", "state", "result", "error", "retry_in_s", "refund", id="job_id"
            ),
            "channel": self._jobs_channel,
        }
        if self.config.listen:
            rows = await self._write_noting_echoes(params)
        else:
            rows = await self.app.db.fetch("record job outcomes", "job_finish_many", params)
        stale = len(outcomes) - len(rows)
        if stale:
            self.stats.stale_writes += stale
            log.warning(
                "worker %s: %d outcome(s) refused: lease token no longer current", self.id, stale
            )

    async def _write_noting_echoes(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Write outcomes noting the backend each attempt uses, so the notifications
        the write sends are not acted on when this worker hears them (see echoes)."""
        queues = self.config.queues
        backends: list[int] = []

        def noting(pid: int) -> None:
            backends.append(pid)
            self._echoes.expect(pid, queues, asyncio.get_running_loop().time())

        sent: list[str] = []
        try:
            rows = await self.app.db.fetch(
                "record job outcomes", "job_finish_many", params, before_send=noting
            )
            sent = rows[0]["woken"] if rows else []
        finally:
            # What a failed attempt sent is unknown: its echo, if any, just wakes us.
            for attempt, pid in enumerate(backends, start=1):
                self._echoes.settle(pid, queues, sent if attempt == len(backends) else [])
        return rows

    def _after_write(self) -> None:
        # Written outcomes may have freed room in a concurrency key (the database
        # count drops at that commit): claim again rather than wait for the poll.
        self._producer.wake()
        if not self._running and len(self._completer) == 0:
            self._idle.set()

    def _held(self) -> list[HeldLease]:
        held = [
            HeldLease(r.job.id, r.job.lease_token)
            for r in self._running.values()
            if r.job.lease_token is not None
        ]
        held += [HeldLease(o.job_id, o.token) for o in self._completer.pending]
        return held

    def _held_ids(self) -> list[int]:
        """Jobs this incarnation holds or started: a release must not refund them.

        Attempts abandoned after a lost lease did start; they are left to the
        rescuer, which counts the attempt, so an attempt number is never reused.
        """
        return [lease.job_id for lease in self._held()] + list(self._abandoned)

    def _report(self) -> WorkerReport:
        stats: dict[str, Any] = dataclasses.asdict(self.stats)
        if self.config.extra:
            stats["labels"] = dict(self.config.extra)
        return WorkerReport(
            running_jobs=len(self._running),
            leaked_slots=len(self._leaked),
            stats=stats,
            state="stopping" if self._stopped else "running",
        )

    async def _drain_running(self) -> None:
        if not self._running:
            return
        grace = self.config.shutdown_grace.total_seconds()
        tasks = [r.task for r in self._running.values()]
        log.info("worker %s: waiting up to %.1fs for %d running job(s)", self.id, grace, len(tasks))
        _, late = await asyncio.wait(tasks, timeout=grace)
        if late:
            log.warning(
                "worker %s: returning %d job(s) still running after the grace period",
                self.id,
                len(late),
            )
            for job_id in [i for i, r in self._running.items() if r.task in late]:
                self._abandon(job_id, "shutdown")
            await asyncio.wait(late)
