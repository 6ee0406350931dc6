"""Bounded waits for tests: poll a condition with a deadline, never a fixed sleep."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from conveyor import App, Job

WAIT_S = 10.0
POLL_S = 0.02


async def wait_until(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = WAIT_S
) -> None:
    """Poll `check` until it is true; fail the test after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(POLL_S)


async def wait_for_state(app: App, job_id: int, state: str, timeout: float = WAIT_S) -> Job:
    """Wait until job `job_id` is in `state`; return it."""
    job: Job | None = None

    async def reached() -> bool:
        nonlocal job
        job = await app.get_job(job_id)
        return job.state == state

    await wait_until(reached, f"job {job_id} to be {state}", timeout)
    assert job is not None
    return job
