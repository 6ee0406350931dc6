"""Claiming under contention, claim order, and fencing by lease token, on the real SQL."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conveyor import App, Config, JobContext
from conveyor.db.control import jobs_channel
from conveyor.testing import freeze_time
from tests.concurrency.claimers import ClaimPlan, ClaimReport, run_claimers
from tests.concurrency.procs import query
from tests.concurrency.sample_app import QUICK

JOBS = 100
RACE_TIMEOUT_S = 90.0
"""Spawning up to 8 interpreters on 2 cores, then the race itself."""


def _race(plans: list[ClaimPlan]) -> list[ClaimReport]:
    """Run one claimer process per plan, all released together; their reports."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(plans))
    reports = ctx.Queue()
    procs = [
        ctx.Process(target=run_claimers, args=(plan, barrier, reports), name=f"claimer-{i}")
        for i, plan in enumerate(plans)
    ]
    for proc in procs:
        proc.start()
    try:
        collected: list[ClaimReport] = [reports.get(timeout=RACE_TIMEOUT_S) for _ in procs]
        for proc in procs:
            proc.join(RACE_TIMEOUT_S)
            assert proc.exitcode == 0, f"{proc.name} exited {proc.exitcode}"
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    return collected


@pytest.mark.parametrize(
    ("processes", "claimers_per_process", "pool_size", "limits"),
    [
        pytest.param(4, 5, 1, (5, 3, 1), id="20-claimers-pool-1"),
        pytest.param(8, 25, 1, (1, 2), id="200-claimers-pool-1"),
        pytest.param(8, 25, 2, (2, 1, 4), id="200-claimers-pool-2"),
    ],
)
async def test_concurrent_claims_take_each_job_exactly_once_with_a_tiny_pool(
    sample_app: App,
    database_url: str,
    processes: int,
    claimers_per_process: int,
    pool_size: int,
    limits: tuple[int, ...],
) -> None:
    jobs = await sample_app.enqueue_many(sample_app.get_task(QUICK).job(n=i) for i in range(JOBS))
    plans = [
        ClaimPlan(database_url, p, claimers_per_process, pool_size, limits)
        for p in range(processes)
    ]

    reports = await asyncio.to_thread(_race, plans)

    errors = [e for r in reports for e in r.errors]
    assert errors == [], "\n".join(errors)
    claims = [
        (wid, job_id, token)
        for r in reports
        for wid, got in r.claims.items()
        for job_id, token in got
    ]
    assert len({wid for r in reports for wid in r.claims}) == processes * claimers_per_process
    claimed_ids = Counter(job_id for _, job_id, _ in claims)
    assert [i for i, n in claimed_ids.items() if n > 1] == [], "jobs claimed twice"
    assert set(claimed_ids) == {j.id for j in jobs}, "jobs never claimed"

    rows = await query(
        sample_app,
        "SELECT id, state::text AS state, attempt, lease_token, worker_id FROM conveyor.jobs",
    )
    assert len(rows) == JOBS
    by_id = {row["id"]: row for row in rows}
    for wid, job_id, token in claims:
        row = by_id[job_id]
        assert (row["state"], row["attempt"], row["lease_token"], row["worker_id"]) == (
            "running",
            1,
            token,
            wid,
        )
    assert len({row["lease_token"] for row in rows}) == JOBS


async def _claim(app: App, queues: str | list[str], limit: int = 1) -> list[dict[str, Any]]:
    return await app.db.fetch(
        "claim",
        "job_claim_many",
        {
            "queues": [queues] if isinstance(queues, str) else queues,
            "limit": limit,
            "worker_id": "test",
            "lease_s": 30,
        },
    )


async def _claim_one_by_one(app: App, queues: str | list[str]) -> list[int]:
    order: list[int] = []
    while rows := await _claim(app, queues):
        assert len(rows) == 1
        order.append(rows[0]["id"])
    return order


def _noop_task(app: App) -> str:
    @app.task(name="noop")
    async def noop(ctx: JobContext, n: int = 0) -> int:
        return n

    return "noop"


async def test_claims_with_equal_priority_take_the_oldest_first(app: App) -> None:
    task = app.get_task(_noop_task(app))
    # Enqueued one statement at a time: run_at grows (or ties, then id decides).
    one_by_one = [(await task.configure(queue="fifo").enqueue(n=i)).id for i in range(6)]
    assert await _claim_one_by_one(app, "fifo") == one_by_one

    # Explicit run times out of id order: the oldest run_at goes first.
    base = datetime(2030, 1, 1, tzinfo=UTC)
    await freeze_time(app, base)
    offsets = [-1, -3, -2, -5, -4]
    by_run_at = [
        (await task.configure(queue="old", run_at=base + timedelta(minutes=m)).enqueue()).id
        for m in offsets
    ]
    expected = [job_id for _, job_id in sorted(zip(offsets, by_run_at, strict=True))]
    assert await _claim_one_by_one(app, "old") == expected


PRIORITIES = [0, 5, 0, 10, 5, -3, 10, 0, -3, 5]


def _priority_order(ids: list[int], priorities: list[int]) -> list[int]:
    """Highest priority first, then enqueue order (ids follow it)."""
    return [ids[i] for i in sorted(range(len(ids)), key=lambda i: (-priorities[i], i))]


async def test_claims_take_higher_priority_first_then_fifo(app: App) -> None:
    task = app.get_task(_noop_task(app))
    one = await app.enqueue_many(
        task.configure(queue="one", priority=p).job(n=i) for i, p in enumerate(PRIORITIES)
    )
    expected = _priority_order([j.id for j in one], PRIORITIES)
    assert await _claim_one_by_one(app, "one") == expected

    batch = await app.enqueue_many(
        task.configure(queue="batch", priority=p).job(n=i) for i, p in enumerate(PRIORITIES)
    )
    expected = _priority_order([j.id for j in batch], PRIORITIES)
    assert {row["id"] for row in await _claim(app, "batch", limit=3)} == set(expected[:3])
    assert {row["id"] for row in await _claim(app, "batch", limit=100)} == set(expected[3:])


async def test_a_claim_over_several_queues_keeps_one_global_order(app: App) -> None:
    task = app.get_task(_noop_task(app))
    # One statement: every run_at is equal, so priority then id (enqueue order) decide.
    queues = ["left", "right"]
    jobs = await app.enqueue_many(
        task.configure(queue=queues[i % 2], priority=p).job(n=i) for i, p in enumerate(PRIORITIES)
    )
    expected = _priority_order([j.id for j in jobs], PRIORITIES)
    assert await _claim_one_by_one(app, queues) == expected

    again = await app.enqueue_many(
        task.configure(queue=queues[i % 2], priority=p).job(n=i) for i, p in enumerate(PRIORITIES)
    )
    expected = _priority_order([j.id for j in again], PRIORITIES)
    first_four = {row["id"] for row in await _claim(app, queues, limit=4)}
    assert first_four == set(expected[:4])


async def _finish(app: App, job_id: int, token: int, result: str) -> int:
    """Record success with `token`; how many rows the fenced write changed."""
    rows = await app.db.fetch(
        "finish",
        "job_finish_many",
        {
            "id": [job_id],
            "token": [token],
            "state": ["succeeded"],
            "result": [json.dumps(result)],
            "error": [None],
            "retry_in_s": [None],
            "refund": [False],
            "channel": jobs_channel("conveyor"),
        },
    )
    return len(rows)


async def _return_to_available(app: App, job_id: int) -> None:
    """What a rescue does to a job whose lease expired (not built yet): back to available."""
    await query(
        app,
        "UPDATE conveyor.jobs SET state = 'available', lease_token = NULL,"
        " lease_expires_at = NULL WHERE id = %s AND state = 'running'",
        [job_id],
    )


async def test_a_stale_lease_token_cannot_record_an_outcome(app: App) -> None:
    task = app.get_task(_noop_task(app))
    job = await task.enqueue()
    (first,) = await _claim(app, "default")
    token_a = first["lease_token"]
    await _return_to_available(app, job.id)
    (second,) = await _claim(app, "default")
    token_b = second["lease_token"]
    assert token_b > token_a

    assert await _finish(app, job.id, token_a, "A") == 0
    assert (await app.get_job(job.id)).state == "running"
    heartbeat = await app.db.fetch(
        "heartbeat",
        "lease_extend_many",
        {"id": [job.id], "token": [token_a], "lease_s": 30},
    )
    assert heartbeat == []

    assert await _finish(app, job.id, token_b, "B") == 1
    assert await _finish(app, job.id, token_a, "A") == 0
    done = await app.get_job(job.id)
    assert (done.state, done.result, done.attempt, done.lease_token) == ("succeeded", "B", 2, None)


async def test_racing_writers_record_only_the_current_token(database_url: str) -> None:
    app = App(database_url, schema="conveyor", config=Config(pool_size=3))
    try:
        task = app.get_task(_noop_task(app))
        job = await task.enqueue()
        tokens: list[int] = []
        for _ in range(6):
            (row,) = await _claim(app, "default")
            tokens.append(row["lease_token"])
            if len(tokens) < 6:
                await _return_to_available(app, job.id)
        current = tokens[-1]

        changed = await asyncio.gather(*(_finish(app, job.id, t, f"t{t}") for t in tokens * 3))

        assert sum(changed) == 1
        winners = {t for t, n in zip(tokens * 3, changed, strict=True) if n}
        assert winners == {current}
        done = await app.get_job(job.id)
        assert (done.state, done.result, done.attempt) == ("succeeded", f"t{current}", 6)
    finally:
        await app.close()
