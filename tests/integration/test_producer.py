"""The producer's claim rhythm: a short claim waits for a wake-up.

A claim that returns fewer jobs than it asked for found less claimable work
than the worker has room for: the queue is drained, or its keys are at their
limits. Claiming again at once would come back empty, and for a busy key that
happened every time one of its jobs ended (one wasted statement per job).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta

from conveyor import App, JobContext, Worker, WorkerConfig
from tests.waiting import wait_until

QUIET_S = 0.3
"""How long a worker with nothing new to claim is watched for a claim it should not send."""


def _count_is(items: list[int], n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(items) == n

    return check


async def test_a_claim_short_of_a_full_key_waits_for_outcomes_instead_of_claiming_again(
    app: App,
) -> None:
    release = asyncio.Event()
    started: list[int] = []

    @app.task(name="held")
    async def held(ctx: JobContext) -> None:
        started.append(ctx.job.id)
        await release.wait()

    keyed = held.configure(concurrency_key="k", concurrency_limit=2)
    await app.enqueue_many(keyed.job() for _ in range(6))
    worker = Worker(app, WorkerConfig(concurrency=10, poll_interval=timedelta(seconds=60)))
    await worker.start()
    try:
        await wait_until(_count_is(started, 2), "the key's first two jobs start")
        claims = worker.claims
        await asyncio.sleep(QUIET_S)  # an immediate re-claim would come within a millisecond
        assert worker.claims == claims
        assert len(started) == 2
        # Outcomes written free room in the key: the worker claims again by itself.
        release.set()
        await wait_until(_count_is(started, 6), "the other four start")
    finally:
        release.set()
        await worker.stop()
