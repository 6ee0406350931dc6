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

from conveyor import App, JobContext, Task, Worker, WorkerConfig
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


async def test_a_claim_that_takes_exactly_a_keys_room_does_not_claim_again_at_once(
    app: App,
) -> None:
    # Two slots, a key of limit 2: the first claim is full, yet nothing more is
    # claimable until an outcome is written. A full claim used to mean "claim
    # again as soon as a slot frees", and that claim came back empty.
    held, releases, started = _held_task(app, 3)
    keyed = held.configure(concurrency_key="k", concurrency_limit=2)
    await app.enqueue_many(keyed.job(i=i) for i in range(3))
    worker = Worker(
        app,
        WorkerConfig(
            concurrency=2,
            poll_interval=timedelta(seconds=60),
            flush_interval=timedelta(seconds=5),
        ),
    )
    await worker.start()
    try:
        await wait_until(_count_is(started, 2), "the key's first two jobs start")
        assert worker.claims == 1
        releases[0].set()
        await wait_until(_count_is(started, 3), "the third starts once the first's outcome is in")
        assert worker.claims == 2
    finally:
        for release in releases:
            release.set()
        await worker.stop()


async def test_a_worker_does_not_claim_on_hearing_its_own_outcome_notification(
    app: App,
) -> None:
    # Writing a keyed outcome notifies every worker that the key has room; the
    # writer claims after its write on its own, so acting on its own echo would
    # send a claim that comes back empty, once per cycle of the key.
    held, releases, started = _held_task(app, 3)
    worker = Worker(app, WorkerConfig(concurrency=4, poll_interval=timedelta(seconds=60)))
    await worker.start()
    try:
        await wait_until(lambda: _true(worker.connected.is_set()), "the worker listens")
        await _quiet(worker)
        before = worker.claims
        keyed = held.configure(concurrency_key="k", concurrency_limit=2)
        await app.enqueue_many(keyed.job(i=n // 2) for n in range(6))
        for pair in range(3):
            await wait_until(_count_is(started, 2 * pair + 2), f"pair {pair} starts")
            releases[pair].set()
        await wait_until(lambda: _true(worker.stats.succeeded == 6), "all six succeed")
        await _quiet(worker)
        # One claim on the enqueue's notification, then one per written pair of
        # outcomes (the last finds nothing left): no claim for any echo.
        assert worker.claims - before == 4
    finally:
        for release in releases:
            release.set()
        await worker.stop()


def _held_task(app: App, count: int) -> tuple[Task, list[asyncio.Event], list[int]]:
    """A task `held(i)` that records `i` when it starts and ends once `releases[i]` is set."""
    releases = [asyncio.Event() for _ in range(count)]
    started: list[int] = []

    @app.task(name="held")
    async def held(ctx: JobContext, i: int) -> None:
        started.append(i)
        await releases[i].wait()

    return held, releases, started


async def _true(value: bool) -> bool:
    return value


async def _quiet(worker: Worker) -> None:
    """Wait until the worker has sent no claim for QUIET_S."""
    while True:
        claims = worker.claims
        await asyncio.sleep(QUIET_S)
        if worker.claims == claims:
            return


async def test_back_to_back_claims_keep_one_connection_and_give_it_back_when_idle(
    app: App,
) -> None:
    # Borrowing and returning a pooled connection per claim was a tenth of a
    # short claim's round trip. While claims come back full, the producer keeps
    # one; once the queue is drained, the pool has every connection again.
    @app.task(name="noop")
    async def noop(ctx: JobContext) -> None:
        return None

    await app.enqueue_many(noop.job() for _ in range(2_000))
    pool = await app.db.pool()
    before = pool.get_stats().get("requests_num", 0)
    worker = Worker(app, WorkerConfig(concurrency=10, poll_interval=timedelta(seconds=60)))
    await worker.start()
    try:
        await wait_until(lambda: _succeeded(worker, 2_000), "every job ran")
        requests = pool.get_stats().get("requests_num", 0) - before
        assert worker.claims >= 200
        # Outcome batches, heartbeats and registration borrow; the claims did not.
        assert requests < worker.claims / 2, (requests, worker.claims)
        await wait_until(lambda: _all_free(app), "the producer gave its connection back")
    finally:
        await worker.stop()


async def _succeeded(worker: Worker, n: int) -> bool:
    return worker.stats.succeeded >= n


async def _all_free(app: App) -> bool:
    """Every connection of the pool can be borrowed at once, right now."""
    held = []
    try:
        for _ in range(app.config.pool_size):
            held.append(await asyncio.wait_for(app.db.hold("probe"), 0.2))
        return True
    except TimeoutError:
        return False
    finally:
        for conn in held:
            await app.db.release(conn)
