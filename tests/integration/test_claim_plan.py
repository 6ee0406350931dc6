"""EXPLAIN guard: the claim statement must walk the partial claim index, never scan the table.

The claim is the hottest statement; a change that turns it into a sequential
scan or a full sort of the backlog makes cost grow with the queue. This test
fails such a change before a benchmark has to notice it.
"""

from __future__ import annotations

import json
from typing import Any

from psycopg import sql

from conveyor import App, JobContext


def _plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    found = [node]
    for child in node.get("Plans", []):
        found += _plan_nodes(child)
    return found


async def test_claim_uses_claim_index_with_large_backlog(app: App) -> None:
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
        # Plain EXPLAIN plans without executing: nothing is claimed.
        cur = await conn.execute(
            sql.SQL("EXPLAIN (FORMAT JSON) ") + app.db.queries["job_claim_many"],
            {"queues": ["default"], "limit": 10, "worker_id": "w", "lease_s": 30.0},
        )
        row = await cur.fetchone()
        assert row is not None
    plan = row["QUERY PLAN"]
    plan = json.loads(plan) if isinstance(plan, str) else plan
    nodes = _plan_nodes(plan[0]["Plan"])
    scans = [(n["Node Type"], n.get("Relation Name"), n.get("Index Name")) for n in nodes]
    assert ("Index Scan", "jobs", "jobs_claim_idx") in scans, scans
    assert not any(kind == "Seq Scan" and rel == "jobs" for kind, rel, _ in scans), scans
    # Rows are locked straight off the ordered index walk, with no sort of the backlog.
    lock_rows = [n for n in nodes if n["Node Type"] == "LockRows"]
    assert lock_rows, scans
    assert [c["Node Type"] for c in lock_rows[0]["Plans"]] == ["Index Scan"], scans
