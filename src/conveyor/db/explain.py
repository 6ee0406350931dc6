"""Read the plan PostgreSQL picks for one of conveyor's named statements.

Plain `EXPLAIN` plans without executing, so a claim explained this way claims
nothing. The benchmark's backlog scenario and the plan guards in the tests use
it to check that hot statements walk the indexes they were written for.

`jobs` is partitioned by task (migration 0013): a plan scans its partitions,
each through its own copy of an index. The nodes name the partitioned table
and index they belong to, so a check reads the same whatever the partitions
are called; the partition's own names stay under "Partition Name" and
"Partition Index Name".
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
from psycopg.rows import dict_row

from conveyor.db.database import Database, Params

PlanNode = dict[str, Any]

CLAIM_EXAMPLE: dict[str, Any] = {
    "queues": ["default"],
    "limit": 10,
    "worker_id": "explain",
    "lease_s": 30.0,
}
"""Parameters of a typical claim, for explaining `job_claim_many`."""


async def plan_nodes(
    db: Database, conn: psycopg.AsyncConnection[Any], query: str, params: Params
) -> list[PlanNode]:
    """Every node of the plan of named `query` with `params`, on `conn`, depth first."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(b"EXPLAIN (FORMAT JSON) " + db.queries[query], params)
        row = await cur.fetchone()
        assert row is not None
        plan = row["QUERY PLAN"]
        nodes = _flatten((json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"])
        names = {n[k] for n in nodes for k in ("Relation Name", "Index Name") if k in n}
        await cur.execute(db.queries["partition_roots"], {"names": sorted(names)})
        roots = {r["name"]: r["root"] for r in await cur.fetchall()}
    for node in nodes:
        for key, original in (
            ("Relation Name", "Partition Name"),
            ("Index Name", "Partition Index Name"),
        ):
            if node.get(key) in roots:
                node[original] = node[key]
                node[key] = roots[node[key]]
    return nodes


def _flatten(node: PlanNode) -> list[PlanNode]:
    found = [node]
    for child in node.get("Plans", []):
        found += _flatten(child)
    return found


def scans(nodes: list[PlanNode]) -> set[tuple[str, str | None, str | None]]:
    """(node type, relation, index) of every node of a plan."""
    return {(n["Node Type"], n.get("Relation Name"), n.get("Index Name")) for n in nodes}
