"""The shape of every long-lived background component: start, stop, a supervised task."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod


class BackgroundService(ABC):
    """Runs `_run` in one asyncio task; `stop` cancels it. Double start/stop are no-ops.

    The owner watches `task`: a service whose task ends on its own has died,
    and the owner must stop loudly rather than run on without it.
    """

    name: str = "service"

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The running task, or None before `start` / after `stop`."""
        return self._task

    def start(self) -> None:
        """Start `_run` in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"conveyor-{self.name}")

    async def stop(self) -> None:
        """Cancel the task and wait for it to end."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    @abstractmethod
    async def _run(self) -> None:
        """The service's loop; it should run until cancelled."""
