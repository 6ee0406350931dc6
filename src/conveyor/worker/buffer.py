"""A batch buffer: collect items, write them in one call at a size or an interval.

Serves the completer. A failed write puts the batch back (in order, ahead of
newer items) and is retried after a pause; `stop` drains what is left. Only a
database unreachable for DRAIN_DEADLINE_S at shutdown makes it give up: those
jobs stay `running` and their leases expire, so they run again elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Generic, TypeVar

from conveyor.db.database import retry_delay

T = TypeVar("T")
log = logging.getLogger("conveyor.worker")

# A drain at shutdown keeps trying this long before it gives up on the database.
DRAIN_DEADLINE_S = 30.0


class BatchBuffer(Generic[T]):
    """Buffers items and hands them to `write` in batches of at most `size`."""

    def __init__(
        self,
        write: Callable[[Sequence[T]], Awaitable[None]],
        *,
        size: int,
        interval: timedelta,
        name: str,
        on_written: Callable[[], None] | None = None,
    ) -> None:
        self._write = write
        self._size = size
        self._interval = interval.total_seconds()
        self._name = name
        self._on_written = on_written
        self._items: list[T] = []
        self._in_flight: list[T] = []
        self._has_items = asyncio.Event()
        self._full = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._failures = 0

    def __len__(self) -> int:
        return len(self._in_flight) + len(self._items)

    @property
    def pending(self) -> Sequence[T]:
        """Items not yet written, including a batch whose write is in flight (a snapshot)."""
        return (*self._in_flight, *self._items)

    def add(self, item: T, *, urgent: bool = False) -> None:
        """Queue `item` for the next write; `urgent` writes without waiting for the interval
        (items that arrive while that write is in flight still share the next one)."""
        self._items.append(item)
        self._has_items.set()
        if urgent or len(self._items) >= self._size:
            self._full.set()

    def hurry(self) -> None:
        """Write what is buffered now rather than at the interval."""
        if self._items:
            self._full.set()

    def start(self) -> None:
        """Start the background flusher."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"conveyor-{self._name}")

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The flusher task, for the worker to supervise."""
        return self._task

    async def stop(self) -> None:
        """Write everything still buffered, then stop; a second call is a no-op."""
        if self._stopping:
            return
        self._stopping = True
        self._has_items.set()
        self._full.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        drain_deadline: float | None = None
        while True:
            if not self._items:
                if self._stopping:
                    return
                await self._has_items.wait()
                self._has_items.clear()
                continue
            if not self._stopping and len(self._items) < self._size:
                # Let more items join this batch, unless it fills first.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self._interval)
            self._full.clear()
            if await self._flush_once():
                continue
            if self._stopping:
                drain_deadline = drain_deadline or loop.time() + DRAIN_DEADLINE_S
                if loop.time() > drain_deadline:
                    log.error("%s: gave up writing %d items at shutdown", self._name, len(self))
                    return
            await asyncio.sleep(retry_delay(min(self._failures, 6)))

    async def _flush_once(self) -> bool:
        batch, self._items = self._items[: self._size], self._items[self._size :]
        self._in_flight = batch
        try:
            await self._write(batch)
        except Exception:
            self._items[:0] = batch
            self._failures += 1
            log.exception("%s: write of %d items failed; will retry", self._name, len(batch))
            return False
        finally:
            self._in_flight = []
        self._failures = 0
        if self._on_written is not None:
            self._on_written()
        return True
