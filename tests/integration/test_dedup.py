"""Invoke-time deduplication and superseding: one live job per (task, dedup key)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from conveyor import App, InvalidJobOptions, JobContext, Task
from conveyor.testing import drain


def _echo(app: App, name: str = "echo") -> Task:
    @app.task(name=name)
    async def echo(ctx: JobContext, n: int) -> int:
        return n

    return echo


async def _live(app: App, key: str) -> list[Any]:
    async with app.db.connection() as conn:
        cur = await conn.execute(
            "SELECT id, args, state::text AS state FROM conveyor.jobs"
            " WHERE dedup_key = %s AND state IN ('scheduled', 'available', 'running')",
            [key],
        )
        return list(await cur.fetchall())


async def test_same_key_returns_the_existing_job_until_it_finishes(app: App) -> None:
    echo = _echo(app)
    first = await echo.configure(dedup_key="k").enqueue(n=1)
    again = await echo.configure(dedup_key="k").enqueue(n=2)
    assert again.id == first.id
    assert again.args == {"n": 1}
    await drain(app)
    later = await echo.configure(dedup_key="k").enqueue(n=3)
    assert later.id != first.id
    assert later.args == {"n": 3}


async def test_keys_are_per_task(app: App) -> None:
    one, two = _echo(app, "one"), _echo(app, "two")
    a = await one.configure(dedup_key="k").enqueue(n=1)
    b = await two.configure(dedup_key="k").enqueue(n=1)
    assert a.id != b.id


async def test_supersede_replaces_a_waiting_job_in_place(app: App) -> None:
    echo = _echo(app)
    first = await echo.configure(dedup_key="k", delay=timedelta(hours=1)).enqueue(n=1)
    newer = await echo.configure(dedup_key="k", on_conflict="supersede", priority=7).enqueue(n=2)
    assert newer.id == first.id
    assert (newer.args, newer.priority, newer.state) == ({"n": 2}, 7, "available")
    assert newer.run_at < first.run_at
    assert len(await _live(app, "k")) == 1


async def test_supersede_leaves_a_running_job_alone_unless_asked(app: App) -> None:
    echo = _echo(app)
    first = await echo.configure(dedup_key="k").enqueue(n=1)
    claimed = await app.db.fetch(
        "claim",
        "job_claim_many",
        {"queues": ["default"], "limit": 1, "worker_id": "w", "lease_s": 60.0},
    )
    assert [r["id"] for r in claimed] == [first.id]
    kept = await echo.configure(dedup_key="k", on_conflict="supersede").enqueue(n=2)
    assert (kept.id, kept.state, kept.args) == (first.id, "running", {"n": 1})

    replaced = await echo.configure(
        dedup_key="k", on_conflict="supersede", supersede_running=True
    ).enqueue(n=3)
    assert replaced.id != first.id
    assert (replaced.state, replaced.args) == ("available", {"n": 3})
    old = await app.get_job(first.id)
    assert old.state == "running"
    assert old.cancel_requested_at is not None
    assert old.dedup_key is None
    assert [row["id"] for row in await _live(app, "k")] == [replaced.id]


async def test_enqueue_many_returns_one_job_per_spec_in_input_order(app: App) -> None:
    echo = _echo(app)
    existing = await echo.configure(dedup_key="x").enqueue(n=0)
    jobs = await app.enqueue_many(
        [
            echo.job(n=1),
            echo.configure(dedup_key="x").job(n=2),
            echo.job(n=3),
            echo.configure(dedup_key="y").job(n=4),
            echo.configure(dedup_key="y").job(n=5),
        ]
    )
    assert [j.args["n"] for j in jobs] == [1, 0, 3, 4, 4]
    assert jobs[1].id == existing.id
    assert jobs[3].id == jobs[4].id
    assert jobs[0].id < jobs[2].id


async def test_concurrent_enqueuers_leave_exactly_one_live_job(app: App, database_url: str) -> None:
    echo = _echo(app)
    others = [App(database_url, schema="conveyor") for _ in range(5)]
    for other in others:
        other.tasks = app.tasks
    try:
        kept = await asyncio.gather(
            *(others[i % 5].enqueue(echo.name, {"n": i}, dedup_key="same") for i in range(50))
        )
        superseded = await asyncio.gather(
            *(
                others[i % 5].enqueue(
                    echo.name, {"n": i}, dedup_key="newest", on_conflict="supersede"
                )
                for i in range(50)
            )
        )
    finally:
        for other in others:
            await other.close()
    assert len({j.id for j in kept}) == 1
    assert len(await _live(app, "same")) == 1
    assert len({j.id for j in superseded}) == 1
    (live,) = await _live(app, "newest")
    assert live["args"]["n"] in range(50)


async def test_dedup_inside_a_rolled_back_transaction_leaves_nothing(
    app: App, database_url: str
) -> None:
    echo = _echo(app)
    conn = await psycopg.AsyncConnection.connect(database_url)
    async with conn, conn.transaction(force_rollback=True):
        job = await echo.configure(dedup_key="k", connection=conn).enqueue(n=1)
        again = await echo.configure(dedup_key="k", connection=conn).enqueue(n=2)
        assert again.id == job.id
    assert await _live(app, "k") == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"on_conflict": "supersede"}, "needs a dedup_key"),
        ({"dedup_key": "k", "supersede_running": True}, "supersede_running needs"),
        ({"dedup_key": "", "on_conflict": "ignore"}, "dedup_key must be"),
        ({"dedup_key": "k", "on_conflict": "replace"}, "on_conflict must be"),
    ],
)
async def test_bad_dedup_options_are_typed_errors_and_write_nothing(
    app: App, options: dict[str, Any], message: str
) -> None:
    echo = _echo(app)
    with pytest.raises(InvalidJobOptions, match=message):
        await echo.configure(**options).enqueue(n=1)
    assert await app.counts() == {}
