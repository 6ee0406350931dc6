"""Per-queue statistics equal a recount of the jobs table after every phase."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from conveyor import App, Cancel, JobContext, Worker, WorkerConfig
from conveyor.testing import advance_time, drain, freeze_time


async def _recount(app: App) -> dict[str, dict[str, int]]:
    async with app.db.connection() as conn:
        cur = await conn.execute(
            "SELECT queue,"
            " count(*) FILTER (WHERE state IN ('scheduled', 'available')) AS waiting,"
            " count(*) FILTER (WHERE state = 'running') AS running,"
            " count(*) FILTER (WHERE state = 'succeeded') AS total_succeeded,"
            " count(*) FILTER (WHERE state = 'failed') AS total_failed,"
            " count(*) FILTER (WHERE state = 'cancelled') AS total_cancelled,"
            " count(*) AS total_enqueued"
            " FROM conveyor.jobs GROUP BY queue"
        )
        rows: list[dict[str, Any]] = list(await cur.fetchall())
    return {r.pop("queue"): {k: int(v) for k, v in r.items()} for r in rows}


async def _stats(app: App) -> dict[str, dict[str, int]]:
    return {
        s.queue: {
            "waiting": s.waiting,
            "running": s.running,
            "total_succeeded": s.total_succeeded,
            "total_failed": s.total_failed,
            "total_cancelled": s.total_cancelled,
            "total_enqueued": s.total_enqueued,
        }
        for s in await app.queue_stats()
    }


async def test_queue_stats_equal_a_recount_through_every_phase(app: App) -> None:
    @app.task(name="ok", queue="a")
    async def ok(ctx: JobContext) -> None:
        return None

    @app.task(name="bad", queue="b", max_attempts=1)
    async def bad(ctx: JobContext) -> None:
        raise RuntimeError("boom")

    @app.task(name="quit", queue="b")
    async def quit_(ctx: JobContext) -> None:
        raise Cancel("not today")

    await freeze_time(app, datetime(2026, 2, 2, 12, tzinfo=UTC))
    await app.enqueue_many([ok.job() for _ in range(20)] + [bad.job() for _ in range(5)])
    await quit_.enqueue()
    await ok.configure(delay=timedelta(hours=1)).enqueue()
    assert await _stats(app) == await _recount(app)

    claimed = await app.db.fetch(
        "claim", "job_claim_many",
        {"queues": ["a", "b"], "limit": 4, "worker_id": "ghost", "lease_s": 30.0},
    )  # fmt: skip
    assert len(claimed) == 4
    assert await _stats(app) == await _recount(app)

    await app.cancel_many(queue="a", ids=[claimed[0]["id"], 1, 2, 3])
    assert await _stats(app) == await _recount(app)

    # The ghost worker's claims go back (a lost claim's release), then a worker drains.
    await app.db.fetch(
        "release", "job_release_unheld",
        {"worker_id": "ghost", "held": [], "channel": "conveyor.jobs"},
    )  # fmt: skip
    assert await _stats(app) == await _recount(app)
    await drain(app, WorkerConfig(queues=("a", "b"), poll_interval=timedelta(milliseconds=50)))
    assert await _stats(app) == await _recount(app)

    # The delayed job is claimed by a worker that dies; the rescuer takes it back.
    await advance_time(app, timedelta(hours=1))
    await app.db.fetch(
        "claim", "job_claim_many",
        {"queues": ["a"], "limit": 1, "worker_id": "ghost", "lease_s": 30.0},
    )  # fmt: skip
    await advance_time(app, timedelta(minutes=1))
    report = await Worker(app, WorkerConfig(run_rescuer=False)).rescuer.run_once()
    assert len(report.rescued) == 1
    assert await _stats(app) == await _recount(app)

    async with app.db.connection() as conn:
        await conn.execute("DELETE FROM conveyor.jobs WHERE state = 'succeeded'")
    after_delete = await _stats(app)
    recount = await _recount(app)
    for queue, counts in after_delete.items():
        live = recount.get(queue, {"waiting": 0, "running": 0})
        assert (counts["waiting"], counts["running"]) == (live["waiting"], live["running"])
    assert after_delete["a"]["total_succeeded"] > 0, "retention keeps the totals"


async def test_an_open_caller_transaction_blocks_no_worker_on_its_queue(
    app: App, database_url: str
) -> None:
    import psycopg

    @app.task(name="ok", queue="a")
    async def ok(ctx: JobContext) -> None:
        return None

    await app.enqueue_many([ok.job() for _ in range(30)])
    conn = await psycopg.AsyncConnection.connect(database_url)
    async with conn, conn.transaction(force_rollback=True):
        # The caller's statement appended its queue delta and holds that row only.
        await ok.configure(connection=conn).enqueue()
        jobs = await drain(
            app,
            WorkerConfig(queues=("a",), concurrency=4, poll_interval=timedelta(milliseconds=50)),
            timeout=20,
        )
        assert sum(j.state == "succeeded" for j in jobs) == 30
    assert await _stats(app) == await _recount(app)
