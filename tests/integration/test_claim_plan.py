"""EXPLAIN guard: the claim statement must walk the partial claim index, never scan the table.

The claim is the hottest statement; a change that turns it into a sequential
scan or a full sort of the backlog makes cost grow with the queue. This test
fails such a change before a benchmark has to notice it.

`jobs` is partitioned by task: each plan is checked with only the default
partition, and with a second task in a partition of its own, where every walk
becomes an ordered merge of the partitions' index walks. `plan_nodes` names
partitions and their indexes after the partitioned table and index.
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

PLAN_MODES = pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
LAYOUTS = pytest.mark.parametrize(
    "partitioned", [False, True], ids=["default_only", "two_partitions"]
)


@LAYOUTS
@PLAN_MODES
async def test_claim_uses_claim_index_with_large_backlog(
    app: App, plan_cache_mode: str, partitioned: bool
) -> None:
    # Both plans: a claim is planned once per connection (generic) in steady state.
    @app.task(name="noop")
    async def noop(ctx: JobContext) -> None:
        return None

    await _second_partition(app, partitioned)
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
    assert _walks(lock_rows[0]["Plans"][0]) == ["Index Scan"] * (1 + partitioned), scans


@LAYOUTS
@PLAN_MODES
async def test_a_keys_due_work_is_found_by_a_probe_not_a_scan_of_its_backlog(
    app: App, plan_cache_mode: str, partitioned: bool
) -> None:
    # "Does this key have a due job" once bitmap-scanned every waiting job of
    # the key at every claim: cost grew with the key's backlog.
    @app.task(name="hot", concurrency_limit=10, concurrency_key="hot")
    async def hot(ctx: JobContext) -> None:
        return None

    await _second_partition(app, partitioned)
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


@LAYOUTS
@PLAN_MODES
async def test_an_outcome_batch_probes_the_primary_key_per_outcome(
    app: App, plan_cache_mode: str, partitioned: bool
) -> None:
    # Statistics taken while nothing ran make "running" look empty: the outcome
    # write once hashed every running job (or walked them all in jobs_lease_idx)
    # per batch. It must find each job by id, however many run.
    @app.task(name="noop")
    async def noop(ctx: JobContext) -> None:
        return None

    await _second_partition(app, partitioned)
    await app.enqueue_many([noop.job() for _ in range(5_000)])
    async with app.db.connection() as conn:
        await conn.execute("ANALYZE conveyor.jobs")
        await conn.execute(
            "UPDATE conveyor.jobs SET state = 'running', lease_token = id, "
            "lease_expires_at = now() + interval '1 minute' WHERE id % 2 = 0"
        )
        await _plan_with(conn, plan_cache_mode)
        nodes = await plan_nodes(app.db, conn, "job_finish_many", _outcomes([2, 4, 6]))
    assert _outcome_reads(nodes) == [("Index Scan", "_pkey")] * (1 + partitioned), nodes


@PLAN_MODES
async def test_an_outcome_batch_probes_by_id_on_a_table_never_analyzed(
    app: App, plan_cache_mode: str
) -> None:
    # A worker's session plans the outcome write once, often before the table
    # was ever analyzed. Only a unique index on id alone tells the planner then
    # that each outcome matches one row; with the key (id, task) it hashed the
    # outcomes and read the whole table for every batch.
    @app.task(name="noop")
    async def noop(ctx: JobContext) -> None:
        return None

    async with app.db.connection() as conn:
        await conn.execute("ALTER TABLE conveyor.jobs_default SET (autovacuum_enabled = off)")
    await app.enqueue_many([noop.job() for _ in range(5_000)])
    async with app.db.connection() as conn:
        await conn.execute(
            "UPDATE conveyor.jobs SET state = 'running', lease_token = id, "
            "lease_expires_at = now() + interval '1 minute' WHERE id % 2 = 0"
        )
        await _plan_with(conn, plan_cache_mode)
        nodes = await plan_nodes(app.db, conn, "job_finish_many", _outcomes([2, 4, 6]))
    assert _outcome_reads(nodes) == [("Index Scan", "_pkey")], nodes


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


async def _second_partition(app: App, partitioned: bool) -> None:
    """With `partitioned`, give another task a partition of its own holding as
    many jobs as the test's task will have waiting."""
    if not partitioned:
        return

    @app.task(name="other")
    async def other(ctx: JobContext) -> None:
        return None

    await app.partitions.create("other")
    await app.enqueue_many([other.job() for _ in range(20_000)])


def _walks(node: dict[str, Any]) -> list[str]:
    """The scans feeding `node` in order: itself, or the children of an ordered
    merge of partitions (a plain Append or a Sort would not keep the walk's order)."""
    if node["Node Type"] == "Merge Append":
        return [child["Node Type"] for child in node["Plans"]]
    return [node["Node Type"]]


def _outcomes(ids: list[int]) -> dict[str, Any]:
    """Parameters of an outcome batch: jobs `ids` succeeded, each with its id as token."""
    return {
        "id": ids,
        "token": ids,
        "state": ["succeeded"] * len(ids),
        "result": ["null"] * len(ids),
        "error": [None] * len(ids),
        "retry_in_s": [0.0] * len(ids),
        "refund": [False] * len(ids),
        "channel": "conveyor.jobs",
    }


def _outcome_reads(nodes: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """How an outcome write reads the jobs it updates: (scan, index name suffix).
    Each partition has its own primary key on id, named after the partition."""
    reads = [
        n for n in nodes if n.get("Relation Name") == "jobs" and n["Node Type"] != "ModifyTable"
    ]
    names = [str(n.get("Index Name")) for n in reads]
    return [
        (n["Node Type"], "_pkey" if name.endswith("_pkey") else name)
        for n, name in zip(reads, names, strict=True)
    ]
