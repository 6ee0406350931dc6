"""Concurrency keys in one process: per-key FIFO, limits (also changed at runtime),
retry backoff that does not block its key, independence from other keys and from
unkeyed work, persisted counts equal to a recount, typed errors for bad input,
and the claim plan on a large keyed backlog."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conveyor import (
    App,
    ConfigError,
    InvalidArguments,
    InvalidJobOptions,
    JobContext,
    JobSpec,
    Retry,
    Task,
    Worker,
    WorkerConfig,
)
from conveyor.db.explain import CLAIM_EXAMPLE, plan_nodes
from conveyor.testing import advance_time, database_now, drain, freeze_time
from tests.concurrency.procs import (
    KeyCounts,
    counts_differ,
    key_counts,
    query,
    recount,
    snapshot_key_counts,
)
from tests.integration.conftest import CountJobs
from tests.waiting import WAIT_S, wait_for_state, wait_until

FROZEN = datetime(2026, 9, 1, 10, 0, tzinfo=UTC)
POLL = timedelta(milliseconds=50)
WORK_S = 0.005
"""A task's "work": long enough that a second job of its key, if one were wrongly
started, would overlap it."""
LIVE = ("waiting", "running")
TOTALS = ("total_enqueued", "total_succeeded", "total_failed", "total_cancelled")


def config(concurrency: int, **options: Any) -> WorkerConfig:
    return WorkerConfig(
        concurrency=concurrency,
        poll_interval=POLL,
        shutdown_grace=timedelta(seconds=1),
        **options,
    )


@contextlib.asynccontextmanager
async def running_worker(app: App, worker_config: WorkerConfig) -> AsyncIterator[Worker]:
    worker = Worker(app, worker_config)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


async def assert_counts_match(app: App) -> KeyCounts:
    """`app.keys()` equals a recount of the jobs table; returns the counts."""
    stats = await key_counts(app)
    assert counts_differ(stats, await recount(app)) == {}
    return stats


async def one_key(app: App, key: str, queue: str = "default") -> dict[str, int]:
    return (await key_counts(app))[(queue, key)]


async def started_in_id_order(app: App, key: str) -> bool:
    """The key's claimed jobs, ordered by id, have non-decreasing start times."""
    rows = await query(
        app,
        "SELECT started_at FROM conveyor.jobs WHERE concurrency_key = %s"
        " AND started_at IS NOT NULL ORDER BY id",
        [key],
    )
    times = [r["started_at"] for r in rows]
    return times == sorted(times)


async def running_ids(app: App, key: str) -> list[int]:
    rows = await query(
        app,
        "SELECT id FROM conveyor.jobs WHERE concurrency_key = %s AND state = 'running' ORDER BY id",
        [key],
    )
    return [r["id"] for r in rows]


async def claims_pass(worker: Worker, claims: int = 3) -> None:
    """Wait until the worker has sent `claims` more claim statements (it had its chance)."""
    target = worker.claims + claims

    async def claimed() -> bool:
        return worker.claims >= target

    await wait_until(claimed, f"{claims} more claims")


class Gates:
    """One gate per label: a held task waits (bounded) until the test opens its gate."""

    def __init__(self) -> None:
        self._events: defaultdict[Any, asyncio.Event] = defaultdict(asyncio.Event)

    def open(self, *labels: Any) -> None:
        for label in labels:
            self._events[label].set()

    async def wait(self, label: Any) -> None:
        await asyncio.wait_for(self._events[label].wait(), WAIT_S)


class Overlap:
    """Counts how many task bodies run at once, per group, and the most ever seen."""

    def __init__(self) -> None:
        self.now: defaultdict[Any, int] = defaultdict(int)
        self.peak: defaultdict[Any, int] = defaultdict(int)

    @contextlib.contextmanager
    def inside(self, group: Any) -> Any:
        self.now[group] += 1
        self.peak[group] = max(self.peak[group], self.now[group])
        try:
            yield
        finally:
            self.now[group] -= 1


# -- ordering and limits ---------------------------------------------------------


async def test_fifo_with_persistence_limit_one_key(database_url: str, app: App) -> None:
    def register(on: App, started: list[int], overlap: Overlap) -> Any:
        @on.task(name="fifo", concurrency_limit=1)
        async def fifo(ctx: JobContext, n: int) -> int:
            with overlap.inside("fifo"):
                started.append(n)
                await asyncio.sleep(WORK_S)
            return n

        return fifo

    # Enqueued by one App, which then goes away: the queue and the key live in the
    # database, and a fresh App's worker runs them.
    fifo = register(app, [], Overlap())
    jobs = [await fifo.enqueue(n=n) for n in range(10)]
    assert all(j.concurrency_key == "fifo" for j in jobs)
    await app.close()

    started: list[int] = []
    overlap = Overlap()
    fresh = App(database_url, schema=app.config.schema)
    register(fresh, started, overlap)
    try:
        done = await drain(fresh, config(5))
        assert started == list(range(10))
        assert overlap.peak["fifo"] == 1
        assert [j.state for j in done] == ["succeeded"] * 10
        assert [j.attempt for j in done] == [1] * 10
        # Each job was claimed only after the previous one's outcome was committed.
        for before, after in itertools.pairwise(done):
            assert before.finished_at is not None and after.started_at is not None
            assert after.started_at >= before.finished_at
        stats = await assert_counts_match(fresh)
        assert stats[("default", "fifo")] == {
            "waiting": 0,
            "running": 0,
            "total_enqueued": 10,
            "total_succeeded": 10,
            "total_failed": 0,
            "total_cancelled": 0,
        }
        (key,) = await fresh.keys()
        assert (key.queue, key.key, key.concurrency_limit) == ("default", "fifo", 1)
    finally:
        await fresh.close()


async def test_keys_from_arguments_run_independently_each_in_order(app: App) -> None:
    accounts = ("a", "b", "c")
    started: defaultdict[str, list[int]] = defaultdict(list)
    overlap = Overlap()
    first_of_each = asyncio.Event()
    arrived: set[str] = set()
    most_keys_at_once = 0

    @app.task(
        name="per_account", concurrency_limit=1, concurrency_key="acct:{account}", max_attempts=1
    )
    async def per_account(ctx: JobContext, account: str, n: int) -> None:
        nonlocal most_keys_at_once
        with overlap.inside(account):
            started[account].append(n)
            most_keys_at_once = max(most_keys_at_once, sum(1 for v in overlap.now.values() if v))
            if n == 0:
                # Rendezvous: each key's first job waits (bounded) until every key has
                # one running, which only independent keys allow.
                arrived.add(account)
                if len(arrived) == len(accounts):
                    first_of_each.set()
                await asyncio.wait_for(first_of_each.wait(), WAIT_S)
            await asyncio.sleep(WORK_S / 5)

    # 3 keys x 50, interleaved at random (seeded): each key's order is its own.
    order = [account for account in accounts for _ in range(50)]
    random.Random(7).shuffle(order)
    # Number each key's jobs in enqueue order, so "in order" means 0, 1, 2, ...
    numbered = []
    seen: defaultdict[str, int] = defaultdict(int)
    for account in order:
        numbered.append(per_account.job(account=account, n=seen[account]))
        seen[account] += 1
    await app.enqueue_many(numbered)

    done = await drain(app, config(6))

    assert [j.state for j in done] == ["succeeded"] * 150
    assert {j.concurrency_key for j in done} == {f"acct:{a}" for a in accounts}
    for account in accounts:
        assert started[account] == list(range(50)), account
        assert overlap.peak[account] == 1, account
        assert await started_in_id_order(app, f"acct:{account}")
    assert most_keys_at_once == 3
    stats = await assert_counts_match(app)
    assert {k: v["total_succeeded"] for k, v in stats.items()} == {
        ("default", f"acct:{a}"): 50 for a in accounts
    }


async def test_cancelled_while_queued_the_rest_keep_their_order(app: App) -> None:
    started: list[int] = []

    @app.task(name="ordered", concurrency_limit=1)
    async def ordered(ctx: JobContext, n: int) -> None:
        started.append(n)

    jobs = await app.enqueue_many(ordered.job(n=n) for n in range(1, 11))
    # Positions 2, 5 and 8 (1-based) are cancelled before any worker runs.
    cancelled = {jobs[p - 1].id for p in (2, 5, 8)}
    assert await app.cancel_many(ids=sorted(cancelled)) == dict.fromkeys(cancelled, "cancelled")
    stats = await assert_counts_match(app)
    assert stats[("default", "ordered")] == {
        "waiting": 7,
        "running": 0,
        "total_enqueued": 10,
        "total_succeeded": 0,
        "total_failed": 0,
        "total_cancelled": 3,
    }

    done = await drain(app, config(5))

    assert started == [n for n in range(1, 11) if n not in (2, 5, 8)]
    assert {j.id for j in done if j.state == "cancelled"} == cancelled
    assert all(j.started_at is None for j in done if j.id in cancelled)
    stats = await assert_counts_match(app)
    assert stats[("default", "ordered")] == {
        "waiting": 0,
        "running": 0,
        "total_enqueued": 10,
        "total_succeeded": 7,
        "total_failed": 0,
        "total_cancelled": 3,
    }


async def test_limit_changed_at_runtime_applies_from_the_next_claim(app: App) -> None:
    gates = Gates()
    started: list[int] = []

    @app.task(name="held", concurrency_limit=1)
    async def held(ctx: JobContext, n: int) -> None:
        started.append(n)
        await gates.wait(n)

    jobs = await app.enqueue_many(held.job(n=n) for n in range(6))
    ids = [j.id for j in jobs]

    async def running_is(expected: list[int]) -> bool:
        return await running_ids(app, "held") == expected

    async with running_worker(app, config(6)) as worker:
        await wait_until(lambda: running_is(ids[:1]), "the first job running")
        # The worker has 5 free slots and claims again and again: the key stays at 1.
        await claims_pass(worker)
        assert await running_ids(app, "held") == ids[:1]
        assert (await one_key(app, "held"))["waiting"] == 5

        raised = await app.set_limit("held", 3)
        assert (raised.concurrency_limit, raised.running, raised.waiting) == (3, 1, 5)
        await wait_until(lambda: running_is(ids[:3]), "three jobs running")
        await claims_pass(worker)
        assert await running_ids(app, "held") == ids[:3]

        # Lowered to 1 with 3 running: nothing new starts until running drains below 1.
        await app.set_limit("held", 1)
        gates.open(0)
        await wait_until(lambda: running_is(ids[1:3]), "job 0 done")
        await claims_pass(worker)
        assert await running_ids(app, "held") == ids[1:3]
        gates.open(1)
        await wait_until(lambda: running_is(ids[2:3]), "job 1 done")
        await claims_pass(worker)
        assert await running_ids(app, "held") == ids[2:3]
        gates.open(2)
        await wait_until(lambda: running_is(ids[3:4]), "job 3 started after job 2")
        gates.open(3, 4, 5)
        await wait_until(lambda: running_is([]), "all done")
        await worker.wait_until_idle()

    assert started == list(range(6))
    assert await started_in_id_order(app, "held")
    stats = await assert_counts_match(app)
    assert stats[("default", "held")]["total_succeeded"] == 6


async def test_retrying_head_does_not_block_its_key_and_keeps_its_place(app: App) -> None:
    gates = Gates()
    runs: list[tuple[str, int]] = []

    @app.task(name="head", concurrency_limit=1, max_attempts=3)
    async def head(ctx: JobContext, label: str) -> None:
        runs.append((label, ctx.attempt))
        if label == "A" and ctx.attempt == 1:
            raise Retry(delay=timedelta(seconds=10))
        await gates.wait(label)

    await freeze_time(app, FROZEN)
    a = await head.enqueue(label="A")
    b = await head.enqueue(label="B")
    async with running_worker(app, config(3)) as worker:
        # A failed its first attempt and waits 10 s: B, a later job, goes ahead.
        await wait_for_state(app, b.id, "running")
        waiting_a = await app.get_job(a.id)
        assert (waiting_a.state, waiting_a.run_at) == ("scheduled", FROZEN + timedelta(seconds=10))
        assert runs == [("A", 1), ("B", 1)]

        # C is enqueued meanwhile; then A falls due while B still holds the key.
        c = await head.enqueue(label="C")
        await advance_time(app, timedelta(seconds=10))
        await claims_pass(worker)
        assert await running_ids(app, "head") == [b.id]
        assert (await app.get_job(c.id)).state == "available"

        # B ends: A (the earlier id) is claimed before C.
        gates.open("B")
        await wait_for_state(app, a.id, "running")
        await claims_pass(worker)
        assert (await app.get_job(c.id)).state == "available"
        gates.open("A", "C")
        await wait_for_state(app, c.id, "succeeded")
        await worker.wait_until_idle()

    assert runs == [("A", 1), ("B", 1), ("A", 2), ("C", 1)]
    done = await app.get_jobs([a.id, b.id, c.id])
    assert [(j.state, j.attempt) for j in done] == [
        ("succeeded", 2),
        ("succeeded", 1),
        ("succeeded", 1),
    ]
    stats = await assert_counts_match(app)
    assert stats[("default", "head")]["total_succeeded"] == 3


async def test_unkeyed_work_keeps_priority_order_and_is_not_blocked_by_a_full_key(
    app: App,
) -> None:
    gates = Gates()
    started: list[str] = []

    @app.task(name="keyed", concurrency_limit=1)
    async def keyed(ctx: JobContext, label: str) -> None:
        started.append(label)
        await gates.wait(label)

    @app.task(name="plain")
    async def plain(ctx: JobContext, label: str) -> None:
        started.append(label)

    await freeze_time(app, FROZEN)
    k = [await keyed.enqueue(label=f"k{n}") for n in range(3)]
    plain_jobs = [
        await plain.configure(priority=priority).enqueue(label=label)
        for label, priority in [("low", -5), ("mid", 0), ("high", 10), ("mid2", 0)]
    ]
    async with running_worker(app, config(2)) as worker:
        # One slot is held by k0; the other runs every unkeyed job, by priority,
        # while k1 and k2 wait for their key.
        for job in plain_jobs:
            await wait_for_state(app, job.id, "succeeded")
        await claims_pass(worker)
        assert await running_ids(app, "keyed") == [k[0].id]
        assert [j.state for j in await app.get_jobs([k[1].id, k[2].id])] == ["available"] * 2
        assert [s for s in started if not s.startswith("k")] == ["high", "mid", "mid2", "low"]

        gates.open("k0", "k1", "k2")
        await wait_for_state(app, k[2].id, "succeeded")
        await worker.wait_until_idle()

    assert [s for s in started if s.startswith("k")] == ["k0", "k1", "k2"]
    stats = await assert_counts_match(app)
    assert list(stats) == [("default", "keyed")]


async def test_one_claim_cuts_a_keys_tail_but_never_takes_a_later_job_first(app: App) -> None:
    @app.task(name="keyed", concurrency_limit=3)
    async def keyed(ctx: JobContext, n: int) -> None: ...

    @app.task(name="plain")
    async def plain(ctx: JobContext) -> None: ...

    await freeze_time(app, FROZEN)
    # The key's later jobs have a higher priority than its head, and than the unkeyed job.
    k = [await keyed.configure(priority=p).enqueue(n=n) for n, p in enumerate((0, 10, 10))]
    u = await plain.configure(priority=5).enqueue()

    async def claim(limit: int) -> list[int]:
        rows = await app.db.fetch(
            "claim",
            "job_claim_many",
            {"queues": ["default"], "limit": limit, "worker_id": "w", "lease_s": 30.0},
        )
        return sorted(r["id"] for r in rows)

    # The key sorts as a block behind its head (priority 0): the limit cuts its tail.
    assert await claim(2) == sorted([u.id, k[0].id])
    assert await claim(2) == [k[1].id, k[2].id]
    assert await claim(2) == []
    stats = await assert_counts_match(app)
    assert stats[("default", "keyed")]["running"] == 3


async def test_keys_are_served_least_recently_started_first_whatever_was_enqueued_since(
    app: App,
) -> None:
    # The claim's key order is the last start of a job of the key (served_at),
    # which only a claim moves: an enqueue or an outcome leaves it, so the key
    # row's other updates are HOT and a busy key cannot jump the line by
    # receiving more work.
    @app.task(name="keyed", concurrency_limit=1, concurrency_key="{k}")
    async def keyed(ctx: JobContext, k: str) -> None: ...

    async def claim_one() -> dict[str, Any]:
        (row,) = await app.db.fetch(
            "claim",
            "job_claim_many",
            {"queues": ["default"], "limit": 1, "worker_id": "w", "lease_s": 30.0},
        )
        return row

    a1 = await keyed.enqueue(k="a")
    b1 = await keyed.enqueue(k="b")
    first = await claim_one()
    assert first["id"] == a1.id  # neither served yet: the older key first
    await app.db.fetch(
        "finish",
        "job_finish_many",
        {
            "id": [first["id"]], "token": [first["lease_token"]], "state": ["succeeded"],
            "result": ["null"], "error": [None], "retry_in_s": [0.0], "refund": [False],
            "channel": "conveyor.jobs",
        },
    )  # fmt: skip
    await keyed.enqueue(k="a")
    await keyed.enqueue(k="b")  # b changed last, but was never served
    assert (await claim_one())["id"] == b1.id
    keys = {k.key: k for k in await app.keys()}
    assert keys["a"].served_at is not None and keys["b"].served_at is not None
    assert keys["a"].served_at < keys["b"].served_at


async def test_first_enqueue_sets_the_limit_per_queue_and_enqueue_never_overrides_it(
    app: App,
) -> None:
    @app.task(name="limited", concurrency_limit=2, concurrency_key="k")
    async def limited(ctx: JobContext) -> None: ...

    await limited.enqueue()
    await limited.configure(concurrency_limit=7).enqueue()
    await limited.configure(queue="other", concurrency_limit=4).enqueue()
    limits = {(k.queue, k.key): k.concurrency_limit for k in await app.keys()}
    assert limits == {("default", "k"): 2, ("other", "k"): 4}

    changed = await app.set_limit("k", 9, queue="other")
    assert (changed.queue, changed.key, changed.concurrency_limit) == ("other", "k", 9)
    assert changed.waiting == 1  # the counts are untouched
    await limited.configure(queue="other").enqueue()
    # A key set before its first job: the enqueue keeps the limit set.
    await app.set_limit("fresh", 6)
    await app.enqueue_many([JobSpec(task="limited", concurrency_key="fresh", concurrency_limit=1)])

    keys = {(k.queue, k.key): k for k in await app.keys()}
    assert {key: k.concurrency_limit for key, k in keys.items()} == {
        ("default", "fresh"): 6,
        ("default", "k"): 2,
        ("other", "k"): 9,
    }
    assert [k.key for k in await app.keys(queue="other")] == ["k"]
    assert keys[("other", "k")].waiting == 2
    await assert_counts_match(app)


# -- persisted counts ------------------------------------------------------------


async def test_key_stats_equal_a_recount_after_every_phase(app: App) -> None:
    gate = asyncio.Event()

    @app.task(name="step", concurrency_limit=2, concurrency_key="k:{k}", max_attempts=1)
    async def step(ctx: JobContext, k: str, n: int, mode: str = "ok") -> int:
        if mode == "fail":
            raise RuntimeError(f"{k}{n} fails")
        if mode == "hold":
            await asyncio.wait_for(gate.wait(), WAIT_S)
        return n

    a_ids = await _phase_enqueue(app, step)
    async with running_worker(app, config(6)) as worker, _Sampler(app) as sampler:
        await _phase_loaded_run(app)
        await _phase_cancel(app, a_ids)
        # Completion.
        gate.set()
        await wait_for_state(app, a_ids[3], "succeeded")
        await worker.wait_until_idle()
        stats = await assert_counts_match(app)
        assert stats[("default", "k:a")] == _counts(enqueued=5, cancelled=2, succeeded=3)
    assert sampler.compared > 0
    await _phase_rescue(app)
    await _phase_delete(app)


async def _phase_enqueue(app: App, step: Task) -> list[int]:
    """Three keys in "default", and key k:a again in "other" (its own row)."""
    a_jobs = await app.enqueue_many(step.job(k="a", n=n, mode="hold") for n in range(5))
    await app.enqueue_many(step.job(k="b", n=n, mode="fail") for n in range(4))
    await app.enqueue_many(step.job(k="c", n=n) for n in range(30))
    other = step.configure(queue="other", max_attempts=3)
    await app.enqueue_many(other.job(k="a", n=n) for n in range(3))
    # Enqueued in a transaction that rolls back: neither the job nor its key counts.
    async with app.db.connection() as conn:
        with contextlib.suppress(_Rollback):
            async with conn.transaction():
                await step.configure(connection=conn).enqueue(k="z", n=0)
                raise _Rollback
    stats = await assert_counts_match(app)
    assert {k: (v["waiting"], v["total_enqueued"]) for k, v in stats.items()} == {
        ("default", "k:a"): (5, 5),
        ("default", "k:b"): (4, 4),
        ("default", "k:c"): (30, 30),
        ("other", "k:a"): (3, 3),
    }
    return [j.id for j in a_jobs]


async def _phase_loaded_run(app: App) -> None:
    """Failures and successes go by while k:a's first two jobs stay held."""

    async def settled() -> bool:
        s = await key_counts(app)
        return (
            s[("default", "k:a")]["running"] == 2
            and s[("default", "k:b")]["total_failed"] == 4
            and s[("default", "k:c")]["total_succeeded"] == 30
        )

    await wait_until(settled, "k:a held, k:b failed, k:c succeeded")
    stats = await assert_counts_match(app)
    assert stats[("default", "k:a")] == _counts(enqueued=5, waiting=3, running=2)
    assert stats[("default", "k:b")] == _counts(enqueued=4, failed=4)
    assert stats[("default", "k:c")] == _counts(enqueued=30, succeeded=30)


async def _phase_cancel(app: App, a_ids: list[int]) -> None:
    """One running job (its worker stops it) and one waiting job are cancelled."""
    first, last = a_ids[0], a_ids[-1]
    assert await app.cancel_many(ids=[first, last]) == {
        first: "cancel_requested",
        last: "cancelled",
    }
    await wait_for_state(app, first, "cancelled")

    async def refilled() -> bool:
        return await running_ids(app, "k:a") == a_ids[1:3]

    await wait_until(refilled, "k:a refilled to 2")
    stats = await assert_counts_match(app)
    assert stats[("default", "k:a")] == _counts(enqueued=5, cancelled=2, waiting=1, running=2)


async def _phase_rescue(app: App) -> None:
    """A "crashed" claimer takes the other queue's jobs; its leases expire."""
    # Frozen at the present: the jobs, enqueued on the real clock, are due.
    await freeze_time(app, await database_now(app))
    claimed = await app.db.fetch(
        "claim",
        "job_claim_many",
        {"queues": ["other"], "limit": 10, "worker_id": "ghost", "lease_s": 30.0},
    )
    assert len(claimed) == 2  # the key's limit
    stats = await assert_counts_match(app)
    assert stats[("other", "k:a")] == _counts(enqueued=3, waiting=1, running=2)
    await advance_time(app, timedelta(seconds=31))
    report = await Worker(app, WorkerConfig(run_rescuer=False)).rescuer.run_once()
    assert report.rescued == {r["id"]: "scheduled" for r in claimed}
    stats = await assert_counts_match(app)
    assert stats[("other", "k:a")] == _counts(enqueued=3, waiting=3)


async def _phase_delete(app: App) -> None:
    """Deleting finished jobs keeps the totals; deleting waiting jobs takes them out
    of the live counts."""
    before = await key_counts(app)
    await query(app, "DELETE FROM conveyor.jobs WHERE state = 'succeeded'")
    await query(app, "DELETE FROM conveyor.jobs WHERE queue = 'other'")
    after = await key_counts(app)
    recounted = await recount(app)
    assert set(after) == set(before)
    for key, counts in after.items():
        live = recounted.get(key, dict.fromkeys(LIVE, 0))
        assert {f: counts[f] for f in LIVE} == {f: live[f] for f in LIVE}, key
        assert {f: counts[f] for f in TOTALS} == {f: before[key][f] for f in TOTALS}, key
    assert after[("other", "k:a")] == _counts(enqueued=3)


class _Rollback(Exception):
    pass


def _counts(
    *,
    enqueued: int = 0,
    waiting: int = 0,
    running: int = 0,
    succeeded: int = 0,
    failed: int = 0,
    cancelled: int = 0,
) -> dict[str, int]:
    return {
        "waiting": waiting,
        "running": running,
        "total_enqueued": enqueued,
        "total_succeeded": succeeded,
        "total_failed": failed,
        "total_cancelled": cancelled,
    }


class _Sampler:
    """While a run is under way, compare the key rows with a recount in one snapshot,
    again and again; any difference fails the test when the block ends."""

    def __init__(self, app: App) -> None:
        self._app = app
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.compared = 0
        self.differences: list[Any] = []

    async def _run(self) -> None:
        while not self._stop.is_set():
            stats, recounted = await snapshot_key_counts(self._app)
            if diff := counts_differ(stats, recounted):
                self.differences.append(diff)
            self.compared += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.01)

    async def __aenter__(self) -> _Sampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task
        assert self.differences == []


# -- bad input -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"concurrency_key": "k"}, "concurrency_key needs a concurrency_limit"),
        ({"concurrency_key": lambda args: "k"}, "concurrency_key needs a concurrency_limit"),
        ({"concurrency_limit": 0}, "concurrency_limit"),
        ({"concurrency_limit": -1}, "concurrency_limit"),
        ({"concurrency_limit": 100_001}, "concurrency_limit"),
        ({"concurrency_limit": True}, "concurrency_limit"),
        ({"concurrency_limit": 2.0}, "concurrency_limit"),
    ],
)
def test_bad_key_options_are_refused_at_declaration(
    app: App, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):

        @app.task(name="bad", **options)
        async def bad(ctx: JobContext) -> None: ...

    assert "bad" not in app.tasks


def test_limits_at_the_bounds_are_accepted(app: App) -> None:
    for limit in (1, 100_000):
        app.task(name=f"ok{limit}", concurrency_limit=limit)(_noop)


async def _noop(ctx: JobContext) -> None: ...


async def _nothing_written(app: App, count_jobs: CountJobs) -> None:
    assert await count_jobs() == 0
    assert await app.keys() == []


async def test_key_template_with_a_missing_argument_writes_nothing(
    app: App, count_jobs: CountJobs
) -> None:
    @app.task(name="acct", concurrency_limit=1, concurrency_key="account:{account_id}")
    async def acct(ctx: JobContext, user_id: int) -> None: ...

    @app.task(name="positional", concurrency_limit=1, concurrency_key="k:{0}")
    async def positional(ctx: JobContext, user_id: int) -> None: ...

    with pytest.raises(InvalidArguments, match="account_id"):
        await acct.enqueue(user_id=1)
    with pytest.raises(InvalidArguments):
        await positional.enqueue(user_id=1)
    with pytest.raises(InvalidArguments):
        acct.enqueue_sync(user_id=1)
    # In a batch, one bad job stops the whole batch before anything is written.
    with pytest.raises(InvalidArguments):
        await app.enqueue_many(acct.job(user_id=n) for n in range(3))
    await _nothing_written(app, count_jobs)


@pytest.mark.parametrize(
    "source",
    [
        "{name}",  # formats to ""
        lambda args: "",
        lambda args: 42,
        lambda args: None,
        lambda args: "x" * 201,
        lambda args: "nul\x00key",
        lambda args: args["missing"],
    ],
)
async def test_empty_or_invalid_keys_are_refused(
    app: App, count_jobs: CountJobs, source: Any
) -> None:
    @app.task(name="keyed", concurrency_limit=1, concurrency_key=source)
    async def keyed(ctx: JobContext, name: str) -> None: ...

    with pytest.raises(InvalidArguments):
        await keyed.enqueue(name="")
    await _nothing_written(app, count_jobs)


async def test_empty_key_in_a_job_spec_is_refused(app: App, count_jobs: CountJobs) -> None:
    app.task(name="plain")(_noop)
    with pytest.raises(InvalidArguments):
        await app.enqueue_many([JobSpec(task="plain", concurrency_key="", concurrency_limit=1)])
    with pytest.raises(InvalidJobOptions, match="concurrency_limit"):
        await app.enqueue_many([JobSpec(task="plain", concurrency_key="k")])
    with pytest.raises(InvalidJobOptions, match="concurrency_limit"):
        await app.enqueue_many([JobSpec(task="plain", concurrency_key="k", concurrency_limit=0)])
    await _nothing_written(app, count_jobs)


async def test_key_values_are_stored_verbatim_even_with_braces(app: App) -> None:
    # The template is formatted once, with the job's arguments; what the
    # arguments contain (braces included) is data, not more template.
    @app.task(name="acct", concurrency_limit=1, concurrency_key="account:{account_id}")
    async def acct(ctx: JobContext, account_id: str) -> None: ...

    @app.task(name="by_fn", concurrency_limit=1, concurrency_key=lambda args: args["raw"])
    async def by_fn(ctx: JobContext, raw: str) -> None: ...

    curly = await acct.enqueue(account_id="{x}")
    assert curly.concurrency_key == "account:{x}"
    for raw in ("{}", "a}b", "{0}"):
        job = await by_fn.enqueue(raw=raw)
        assert job.concurrency_key == raw
    await assert_counts_match(app)


@pytest.mark.parametrize("limit", [0, -1, 100_001, True, 1.5, None])
async def test_set_limit_refuses_bad_limits_and_changes_nothing(app: App, limit: Any) -> None:
    @app.task(name="limited", concurrency_limit=3)
    async def limited(ctx: JobContext) -> None: ...

    await limited.enqueue()
    with pytest.raises(InvalidJobOptions, match="concurrency_limit"):
        await app.set_limit("limited", limit)
    with pytest.raises(InvalidJobOptions, match="concurrency_limit"):
        await app.set_limit("unknown", limit)
    assert [(k.key, k.concurrency_limit) for k in await app.keys()] == [("limited", 3)]


async def test_set_limit_refuses_an_empty_key(app: App) -> None:
    with pytest.raises(InvalidArguments):
        await app.set_limit("", 1)
    assert await app.keys() == []


# -- claim plan ------------------------------------------------------------------


async def test_statement_triggers_stay_linear_in_the_rows_a_statement_updates(
    app: App,
) -> None:
    # The count triggers once joined a statement's old and new rows with a plan
    # made at the session's first call, typically a few rows: a nested loop,
    # quadratic for any later statement (20,000 rows took over a minute). The
    # timeout is a guard against that growth with a wide margin, not a timing
    # measurement: paired by grouping, the update takes well under a second.
    @app.task(name="keyed", concurrency_limit=2, concurrency_key="k{n}")
    async def keyed(ctx: JobContext, n: int) -> None: ...

    app.task(name="plain")(_noop)
    await app.enqueue_many(keyed.job(n=i % 50) for i in range(20_000))
    await app.enqueue_many(JobSpec(task="plain") for _ in range(20_000))
    async with app.db.connection() as conn, conn.transaction():
        await conn.execute("SET LOCAL statement_timeout = '30s'")
        # A first, one-row statement plans the triggers' queries for this session.
        await conn.execute(
            "UPDATE conveyor.jobs SET state = 'cancelled', finished_at = now() WHERE id = 1"
        )
        await conn.execute(
            "UPDATE conveyor.jobs SET state = 'succeeded', finished_at = now() "
            "WHERE id % 2 = 0 AND state = 'available'"
        )
    await assert_counts_match(app)
    by_queue = {q.queue: q for q in await app.queue_stats()}
    assert (by_queue["default"].waiting, by_queue["default"].total_succeeded) == (
        20_000 - 1,
        20_000,
    )


async def test_count_trigger_locks_keys_in_key_order_so_crossed_batches_do_not_deadlock(
    app: App,
) -> None:
    # T1 ends a job of key a, then one of key b; T2, between the two, ends one of
    # each in a single statement that names b first. The count trigger locks a
    # statement's key rows in key order before updating any: T2 waits at a
    # holding nothing, T1 takes b and commits, then T2 goes on. Locking in any
    # other order would hold b while waiting for a: a deadlock, one side failing.
    @app.task(name="keyed", concurrency_limit=5, concurrency_key="{k}")
    async def keyed(ctx: JobContext, k: str, n: int) -> None: ...

    jobs = await app.enqueue_many(keyed.job(k=k, n=n) for n in range(2) for k in ("a", "b"))
    ids = {(j.args["k"], j.args["n"]): j.id for j in jobs}
    claimed = await app.db.fetch(
        "claim", "job_claim_many", {**CLAIM_EXAMPLE, "limit": 4, "worker_id": "test"}
    )
    assert len(claimed) == 4
    end = (
        "UPDATE conveyor.jobs AS j SET state = 'succeeded', finished_at = now(), "
        "lease_token = NULL, lease_expires_at = NULL "
        "FROM unnest(%s::bigint[]) WITH ORDINALITY AS u(id, ord) WHERE j.id = u.id"
    )
    async with app.db.connection() as t1, app.db.connection() as t2:
        async with t1.transaction():
            await t1.execute(end, ([ids["a", 0]],))
            crossed = asyncio.create_task(_in_transaction(t2, end, [ids["b", 1], ids["a", 1]]))
            await wait_until(lambda: _waiting_on_a_lock(app), "T2 to wait for key a")
            await t1.execute(end, ([ids["b", 0]],))
        await crossed
    stats = await assert_counts_match(app)
    assert stats[("default", "a")] == _counts(enqueued=2, succeeded=2)
    assert stats[("default", "b")] == _counts(enqueued=2, succeeded=2)


async def _in_transaction(conn: Any, statement: str, ids: list[int]) -> None:
    async with conn.transaction():
        await conn.execute("SET LOCAL lock_timeout = '20s'")  # a hang fails, not blocks
        await conn.execute(statement, (ids,))


async def _waiting_on_a_lock(app: App) -> bool:
    rows = await query(
        app,
        "SELECT count(*) AS n FROM pg_stat_activity "
        "WHERE wait_event_type = 'Lock' AND datname = current_database()",
    )
    return bool(rows[0]["n"])


async def test_claim_walks_both_claim_indexes_with_a_large_keyed_backlog(app: App) -> None:
    @app.task(name="keyed", concurrency_limit=2, concurrency_key="k{n}")
    async def keyed(ctx: JobContext, n: int) -> None: ...

    app.task(name="plain")(_noop)

    await app.enqueue_many(keyed.job(n=i % 100) for i in range(20_000))
    await app.enqueue_many(JobSpec(task="plain") for _ in range(20_000))
    async with app.db.connection() as conn:
        # Half the history finished: it must stay out of the claim path.
        await conn.execute(
            "UPDATE conveyor.jobs SET state = 'succeeded', finished_at = now() WHERE id % 2 = 0"
        )
        await conn.execute("ANALYZE conveyor.jobs")
        await conn.execute("ANALYZE conveyor.concurrency_keys")
        nodes = await plan_nodes(app.db, conn, "job_claim_many", CLAIM_EXAMPLE)
    scans = [(n["Node Type"], n.get("Relation Name"), n.get("Index Name")) for n in nodes]
    indexes = {index for _, rel, index in scans if rel == "jobs"}
    assert {"jobs_claim_idx", "jobs_claim_keyed_idx"} <= indexes, scans
    assert not any(kind == "Seq Scan" and rel == "jobs" for kind, rel, _ in scans), scans
    # Both walks lock rows straight off the ordered index, with no sort of the backlog.
    job_locks = [
        n["Plans"][0]
        for n in nodes
        if n["Node Type"] == "LockRows" and n["Plans"][0].get("Relation Name") == "jobs"
    ]
    assert sorted(c["Index Name"] for c in job_locks) == ["jobs_claim_idx", "jobs_claim_keyed_idx"]
    assert {c["Node Type"] for c in job_locks} == {"Index Scan"}
    # Keys are walked in service order per queue and the walk stops after the
    # limit: an ordered index scan, never a scan and sort of every key with work.
    key_locks = [
        n["Plans"][0]
        for n in nodes
        if n["Node Type"] == "LockRows" and n["Plans"][0].get("Relation Name") == "concurrency_keys"
    ]
    assert [(c["Node Type"], c["Index Name"]) for c in key_locks] == [
        ("Index Scan", "concurrency_keys_waiting_idx")
    ], scans
    stats = await assert_counts_match(app)
    assert len(stats) == 100
