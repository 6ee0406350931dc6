"""What a running task receives as its first argument."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from conveyor import checkpoints
from conveyor.errors import NotInRun
from conveyor.jobs import Job

if TYPE_CHECKING:
    from datetime import timedelta

    from conveyor.app import App
    from conveyor.locks.advisory import AdvisoryLock
    from conveyor.locks.keys import LockKey
    from conveyor.run_context import RunContext


StopReason = Literal["shutdown", "timeout", "cancel", "lease_lost"]


@dataclass(kw_only=True)
class JobContext:
    """The job being run, its app, and the signal that asks it to stop.

    `cancelled` turns true when the worker wants this attempt to end: it is
    shutting down past its grace period, the attempt timed out, the job was
    cancelled, or the lease was lost. Async tasks also get `CancelledError`;
    sync tasks cannot be interrupted, so long ones should check `cancelled`.
    """

    app: App
    job: Job
    worker_id: str
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("conveyor.task"))
    stop_reason: StopReason | None = None
    """Why the worker asked the attempt to stop; None while it may run on."""
    _run: RunContext | None = field(default=None, repr=False)
    _checkpoints: dict[str, Any] | None = field(default=None, repr=False)
    _checkpoint_locks: dict[str, asyncio.Lock] = field(default_factory=dict, repr=False)

    @property
    def run(self) -> RunContext:
        """The pipeline run this job is a step (or the cleanup) of: its input,
        metadata, `prev_results`, state and counters. Raises `NotInRun` otherwise."""
        if self._run is None:
            raise NotInRun(f"job {self.job.id} ({self.job.task}) is not a pipeline step")
        return self._run

    def attach_run(self, run: RunContext) -> None:
        """Give this attempt its run (done by the pipeline before the step starts)."""
        self._run = run

    def lock(self, key: LockKey, *, timeout: float | timedelta | None = None) -> AdvisoryLock:
        """A PostgreSQL advisory lock for this task to hold: `async with ctx.lock("k"):`.
        Its owner names this worker and job, as `conveyor locks` shows."""
        return self.app.lock(key, timeout=timeout, owner=f"{self.worker_id}:job-{self.job.id}")

    async def step(
        self, name: str, fn: Callable[..., Any], /, *args: Any, atomic: bool = False, **kwargs: Any
    ) -> Any:
        """Run `fn(*args, **kwargs)` once per job: a retried attempt gets the
        recorded result back instead of running it again.

        With `atomic=True`, `fn(conn, *args, **kwargs)` gets a connection in an
        open transaction; its writes commit together with the record or not at
        all (exactly-once database effects). See `conveyor.checkpoints`.
        """
        if self._checkpoints is None:
            loaded = await checkpoints.load(self)
            if self._checkpoints is None:  # a concurrent call may have loaded it meanwhile
                self._checkpoints = loaded
        return await checkpoints.run_step(
            self, self._checkpoints, self._checkpoint_locks, name, fn, args, kwargs, atomic=atomic
        )

    @property
    def attempt(self) -> int:
        """This attempt's number, from 1."""
        return self.job.attempt

    @property
    def cancelled(self) -> bool:
        """True once the worker asked this attempt to stop (safe to read from a thread)."""
        return self.stop_reason is not None

    def request_stop(self, reason: StopReason) -> None:
        """Record why the attempt must stop; the first reason wins."""
        if self.stop_reason is None:
            self.stop_reason = reason
