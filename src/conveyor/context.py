"""What a running task receives as its first argument."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from conveyor.jobs import Job

if TYPE_CHECKING:
    from conveyor.app import App


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
