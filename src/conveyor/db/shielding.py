"""Cancellation-safe use of the async pool.

psycopg_pool loses a connection when the task borrowing or returning it is
cancelled at the wrong moment: a waiter cancelled while it is being handed a
connection, or a return interrupted half-way, leaves the pool counting a
connection nobody holds. A worker cancels tasks all the time (job cancels,
timeouts, halted pipeline runs, shutdown), so each such race shrank its pool
for good, until every statement waited out the pool timeout
(`tests/integration/test_pool_cancellation.py` reproduces it).

Here the borrow and the return each run in their own task, shielded from the
caller's cancellation: the caller still gets its `CancelledError` at once,
and the connection always ends up back in the pool. `run_to_end` does the
same for a whole statement, so cancelling a caller never sends the server a
cancel request that could land on the connection's next statement.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from psycopg_pool import AsyncConnectionPool

log = logging.getLogger("conveyor.db")

T = TypeVar("T")

_detached: set[asyncio.Task[Any]] = set()
"""Tasks that outlive a cancelled caller (kept here so they are not collected)."""


def _spawn(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    task = asyncio.ensure_future(coro)
    _detached.add(task)
    task.add_done_callback(_finished)
    return task


def _finished(task: asyncio.Task[Any]) -> None:
    _detached.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        # Its caller was cancelled and is gone; the failure only matters here.
        log.debug("a statement whose caller was cancelled failed: %r", exc)


async def run_to_end(coro: Coroutine[Any, Any, T]) -> T:
    """Await `coro`; if the caller is cancelled, `coro` still runs to its end."""
    return await asyncio.shield(_spawn(coro))


async def take(pool: AsyncConnectionPool[Any], timeout: float | None = None) -> Any:
    """A connection from `pool`, to hand back with `give_back`. A caller cancelled
    while waiting loses nothing: the connection, when it comes, goes back."""
    getting = _spawn(pool.getconn(timeout))
    try:
        return await asyncio.shield(getting)
    except asyncio.CancelledError:
        getting.add_done_callback(lambda got: _give_back(pool, got))
        raise


async def give_back(pool: AsyncConnectionPool[Any], conn: Any) -> None:
    """Return `conn` to `pool`, even if the caller is cancelled meanwhile."""
    await asyncio.shield(_spawn(pool.putconn(conn)))


@asynccontextmanager
async def borrowed(
    pool: AsyncConnectionPool[Any], timeout: float | None = None
) -> AsyncIterator[Any]:
    """A connection from `pool`, returned to it however the block ends."""
    conn = await take(pool, timeout)
    try:
        yield conn
    finally:
        await give_back(pool, conn)


def _give_back(pool: AsyncConnectionPool[Any], got: asyncio.Task[Any]) -> None:
    """Return a connection that arrived after its borrower was cancelled."""
    if not got.cancelled() and got.exception() is None:
        _spawn(pool.putconn(got.result()))
