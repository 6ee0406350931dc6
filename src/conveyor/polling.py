"""Waiting for a database state by polling with backoff (`App.wait`, `app.runs.wait`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

from conveyor.errors import WaitTimeout

T = TypeVar("T")

POLL_MIN_S = 0.01
POLL_MAX_S = 0.25


async def poll_until(
    read: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    timeout: float | timedelta | None,
    still: Callable[[T], str],
) -> T:
    """Call `read` until `done(value)`, backing off from 10 ms to 250 ms; after
    `timeout` raise `WaitTimeout` with `still(last value)` and the seconds waited."""
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
    loop = asyncio.get_running_loop()
    deadline = None if seconds is None else loop.time() + seconds
    pause = POLL_MIN_S
    while True:
        value = await read()
        if done(value):
            return value
        if deadline is not None and loop.time() >= deadline:
            raise WaitTimeout(f"{still(value)} after {seconds}s")
        remaining = None if deadline is None else deadline - loop.time()
        await asyncio.sleep(pause if remaining is None else max(min(pause, remaining), 0))
        pause = min(pause * 2, POLL_MAX_S)
