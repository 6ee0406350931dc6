"""The lock protocol both backends implement, and the guarded `async with` block.

```python
async with lock:                 # acquire (waits up to lock.timeout), release on exit
    ...                          # if the lock is lost meanwhile, this block is cancelled
                                 # and `async with` raises LockLost
```

A guard task watches a held lock while the block runs: it keeps a Redis lock
alive (auto-extend) and notices a lost one (TTL expired, connection gone). On
loss it cancels the task running the block, so the block stops at its next
`await` instead of going on as if it still held the lock; the `async with`
then raises `LockLost`. Code that must not even finish a single await without
the lock should still use the fencing token to protect its writes (see
docs/locks.md).
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import time
import uuid
from abc import ABC, abstractmethod
from datetime import timedelta
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from conveyor.errors import LockError, LockLost, LockTimeout

Seconds = float | timedelta | None
GUARD_STOP_POLL_S = 0.05


def as_seconds(value: Seconds) -> float | None:
    """A duration in seconds (None stays None); `LockError` for anything else than a
    finite, non-negative number of seconds or a timedelta."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise LockError(f"a duration is seconds or a timedelta, got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise LockError(f"a duration must be finite and not negative, got {value!r}")
    return seconds


def default_owner() -> str:
    """An owner id unique to this lock object: host, process and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


@runtime_checkable
class Lock(Protocol):
    """What every conveyor lock offers, whatever its backend."""

    @property
    def owner(self) -> str:
        """Who this lock object acts for; only it may release or extend."""
        ...

    @property
    def held(self) -> bool:
        """True between a successful acquire and release (or loss)."""
        ...

    @property
    def fencing_token(self) -> int | None:
        """A number that grows with every acquisition of any lock of the backend;
        pass it along with protected writes so a stale holder's write can be refused."""
        ...

    async def acquire(self, timeout: Seconds = None) -> bool:
        """Take the lock: True once held, False if `timeout` passed first (never raises
        for contention). None waits as long as it takes; 0 tries once."""
        ...

    async def release(self) -> None:
        """Give the lock up; raises `LockNotOwned` if this owner does not hold it."""
        ...

    async def extend(self, ttl: Seconds = None) -> None:
        """Keep holding it for `ttl` more (Redis), or check it is still held
        (advisory); raises `LockNotOwned` or `LockLost` otherwise."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class GuardedLock(ABC):
    """The shared half of both backends: acquire/release bookkeeping and the guard."""

    def __init__(self, *, owner: str | None, timeout: Seconds) -> None:
        self._owner = owner or default_owner()
        self.timeout = as_seconds(timeout)
        """How long `async with` waits to acquire (None: as long as it takes)."""
        self._held = False
        self._lost = False
        self._token: int | None = None
        self._guard: asyncio.Task[None] | None = None
        self._holder: asyncio.Task[object] | None = None
        self._cancelled_holder = False
        self._stopping = False
        """Set when the block ended: the guard must not act (extend, cancel) any more."""

    @property
    def owner(self) -> str:
        """Who this lock object acts for."""
        return self._owner

    @property
    def held(self) -> bool:
        """True between a successful acquire and release (or loss)."""
        return self._held and not self._lost

    @property
    def lost(self) -> bool:
        """True once the guard saw the lock go away while held."""
        return self._lost

    @property
    def fencing_token(self) -> int | None:
        """The token of the current (or last) acquisition."""
        return self._token

    def check(self) -> None:
        """Raise `LockLost` if the lock was lost (for code between awaits)."""
        if self._lost:
            raise LockLost(f"lock {self.describe()} was lost")

    @abstractmethod
    def describe(self) -> str:
        """The lock's key, for messages."""

    @abstractmethod
    async def _watch(self) -> None:
        """Return when the held lock is lost; cancelled when it is released."""

    @abstractmethod
    async def _discard(self) -> None:
        """Drop what a lost lock still holds locally (its connection)."""

    async def acquire(self, timeout: Seconds = None) -> bool:
        """See `Lock.acquire`."""
        acquired = await self._acquire(as_seconds(timeout))
        if acquired:
            self._held = True
            self._lost = False
        return acquired

    @abstractmethod
    async def _acquire(self, timeout_s: float | None) -> bool: ...

    @abstractmethod
    async def release(self) -> None:
        """See `Lock.release`."""

    @abstractmethod
    async def extend(self, ttl: Seconds = None) -> None:
        """See `Lock.extend`."""

    async def __aenter__(self) -> Self:
        started = time.monotonic()
        if not await self.acquire(self.timeout):
            waited = time.monotonic() - started
            raise LockTimeout(f"lock {self.describe()} not acquired within {waited:.3f}s")
        self._holder = asyncio.current_task()
        self._cancelled_holder = False
        self._stopping = False
        self._guard = asyncio.create_task(self._run_guard(), name=f"lock-guard {self.describe()}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._stop_guard()
        finally:
            # Even if this exit is cancelled meanwhile, the lock is given up.
            if self._cancelled_holder and self._holder is not None:
                # Our own cancellation of the block: consume it, report the loss instead.
                self._holder.uncancel()
            self._holder = None
            if self._lost:
                self._held = False
                await self._discard()
                raise LockLost(f"lock {self.describe()} was lost while its block ran") from exc
            await self.release()

    async def _run_guard(self) -> None:
        await self._watch()
        if self._stopping:
            return
        self._lost = True
        if self._holder is not None and not self._holder.done():
            self._cancelled_holder = True
            self._holder.cancel(f"lock {self.describe()} lost")

    async def _stop_guard(self) -> None:
        guard, self._guard = self._guard, None
        if guard is None:
            return
        self._stopping = True
        # Cancel until it is done: on Python 3.11 a cancel that lands while the
        # guard's command completes inside asyncio.wait_for can be swallowed.
        # wait(), not await: the guard's own CancelledError must not be taken for
        # a cancellation of this task (which still propagates from wait()).
        while not guard.done():
            guard.cancel()
            await asyncio.wait({guard}, timeout=GUARD_STOP_POLL_S)
