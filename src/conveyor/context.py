"""What a running task receives as its first argument."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from conveyor.jobs import Job

if TYPE_CHECKING:
    from conveyor.app import App


@dataclass(kw_only=True)
class JobContext:
    """The job being run, its app, and the signal that asks it to stop.

    `cancelled` turns true when the worker is shutting down past its grace
    period or the attempt timed out; long sync tasks should check it.
    """

    app: App
    job: Job
    worker_id: str
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("conveyor.task"))
    _stop: asyncio.Event | None = None
    _stop_flag: list[bool] = field(default_factory=lambda: [False])

    @property
    def attempt(self) -> int:
        """This attempt's number, from 1."""
        return self.job.attempt

    @property
    def cancelled(self) -> bool:
        """True once the worker asked this attempt to stop."""
        return self._stop_flag[0]

    def request_stop(self) -> None:
        """Ask the task to stop (thread-safe read via `cancelled`)."""
        self._stop_flag[0] = True
        if self._stop is not None:
            self._stop.set()
