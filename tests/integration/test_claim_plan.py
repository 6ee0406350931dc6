"""EXPLAIN guard: the claim statement must walk the partial claim index, never scan the table.

The claim is the hottest statement; a change that turns it into a sequential
scan or a full sort of the backlog makes cost grow with the queue. This test
fails such a change before a benchmark has to notice it.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import sql

from conveyor import App, JobContext
from conveyor.config import Config
from conveyor.db.explain import CLAIM_EXAMPLE, plan_nodes
from tests.conftest import SCHEMA


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
async def test_claim_uses_claim_index_with_large_backlog(app: App, plan_cache_mode: str) -> None:
    # Both plans: a claim is planned once per connection (generic) in steady state.
    @app.task(name="noop")
    async def noop(ctx: JobContext) -> None:
        return None

    await app.enqueue_many([noop.job() for _ in range(20_000)])
    async with app.db.connection() as conn:
        # Half the history finished: it must stay out of the claim path.
        await conn.execute(
            "UPDATE conveyor.jobs SET state = 'succeeded', finished_at = now() WHERE id % 2 = 0"
        )
        await conn.execute("ANALYZE conveyor.jobs")
        await _plan_with(conn, plan_cache_mode)
        # Plain EXPLAIN plans without executing: nothing is claimed.
        nodes = await plan_nodes(app.db, conn, "job_claim_many", CLAIM_EXAMPLE)
    scans = [(n["Node Type"], n.get("Relation Name"), n.get("Index Name")) for n in nodes]
    assert ("Index Scan", "jobs", "jobs_claim_idx") in scans, scans
    assert not any(kind == "Seq Scan" and rel == "jobs" for kind, rel, _ in scans), scans
    # Rows are locked straight off the ordered index walk, with no sort of the backlog.
    lock_rows = [n for n in nodes if n["Node Type"] == "LockRows"]
    assert lock_rows, scans
    assert [c["Node Type"] for c in lock_rows[0]["Plans"]] == ["Index Scan"], scans


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
async def test_a_keys_due_work_is_found_by_a_probe_not_a_scan_of_its_backlog(
    app: App, plan_cache_mode: str
) -> None:
    # "Does this key have a due job" once bitmap-scanned every waiting job of
    # the key at every claim: cost grew with the key's backlog.
    @app.task(name="hot", concurrency_limit=10, concurrency_key="hot")
    async def hot(ctx: JobContext) -> None:
        return None

    await app.enqueue_many([hot.job() for _ in range(20_000)])
    async with app.db.connection() as conn:
        await conn.execute("ANALYZE conveyor.jobs")
        await _plan_with(conn, plan_cache_mode)
        nodes = await plan_nodes(app.db, conn, "job_claim_many", CLAIM_EXAMPLE)
    scans = [
        (n["Node Type"], n.get("Index Name")) for n in nodes if n.get("Relation Name") == "jobs"
    ]
    assert ("Index Scan", "jobs_keyed_due_idx") in scans, scans
    assert not any(kind.startswith("Bitmap") or kind == "Seq Scan" for kind, _ in scans), scans


async def test_a_worker_connection_plans_the_claim_once_then_reuses_the_generic_plan(
    database_url: str,
) -> None:
    # A custom plan per claim cost more than the claim itself (0.7 ms of planning
    # for the statement's CTEs); its estimates are kept parameter-blind so that
    # PostgreSQL settles on the generic plan after its five custom trials.
    app = App(config=Config(database_url=database_url, schema=SCHEMA, pool_size=1))
    try:
        for _ in range(20):  # psycopg prepares at the 5th; PostgreSQL tries 5 custom plans
            await app.db.fetch(
                "claim",
                "job_claim_many",
                {"queues": ["default", "other"], "limit": 10, "worker_id": "w", "lease_s": 30.0},
                idempotent=False,
            )
        async with app.db.connection() as conn:  # the pool's one connection: the same session
            cur = await conn.execute(
                "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements"
            )
            rows = await cur.fetchall()
    finally:
        await app.close()
    (claim,) = [r for r in rows if r["statement"].startswith("WITH unkeyed AS")]
    assert (claim["custom_plans"], claim["generic_plans"]) == (5, 10), claim


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
async def test_an_outcome_batch_probes_the_primary_key_per_outcome(
    app: App, plan_cache_mode: str
) -> None:
    # Statistics taken while nothing ran make "running" look empty: the outcome
    # write once hashed every running job (or walked them all in jobs_lease_idx)
    # per batch. It must find each job by id, however many run.
    @app.task(name="noop")
    async def noop(ctx: JobContext) -> None:
        return None

    await app.enqueue_many([noop.job() for _ in range(5_000)])
    async with app.db.connection() as conn:
        await conn.execute("ANALYZE conveyor.jobs")
        await conn.execute(
            "UPDATE conveyor.jobs SET state = 'running', lease_token = id, "
            "lease_expires_at = now() + interval '1 minute' WHERE id % 2 = 0"
        )
        await _plan_with(conn, plan_cache_mode)
        nodes = await plan_nodes(
            app.db,
            conn,
            "job_finish_many",
            {
                "id": [2, 4, 6],
                "token": [2, 4, 6],
                "state": ["succeeded"] * 3,
                "result": ["null"] * 3,
                "error": [None] * 3,
                "retry_in_s": [0.0] * 3,
                "refund": [False] * 3,
                "channel": "conveyor.jobs",
            },
        )
    reads = [
        n for n in nodes if n.get("Relation Name") == "jobs" and n["Node Type"] != "ModifyTable"
    ]
    scans = [(n["Node Type"], n.get("Index Name")) for n in reads]
    assert scans == [("Index Scan", "jobs_pkey")], scans


async def test_conveyor_sessions_never_jit_compile(app: App) -> None:
    # The claim's generic plan is estimated blind to its LIMIT; with a million
    # waiting jobs that estimate passed jit_above_cost and every claim spent
    # 45 ms compiling (the backlog benchmark fell from 7,000 to 434 jobs/s).
    async with app.db.connection() as conn:
        cur = await conn.execute("SHOW jit")
        row = await cur.fetchone()
    assert row == {"jit": "off"}


async def _plan_with(conn: psycopg.AsyncConnection[Any], plan_cache_mode: str) -> None:
    """Make the session plan with `plan_cache_mode` (custom or generic plans)."""
    await conn.execute(sql.SQL("SET plan_cache_mode = {}").format(sql.Identifier(plan_cache_mode)))
