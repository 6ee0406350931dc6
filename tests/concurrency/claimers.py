"""Claimer processes for the atomic-claim tests (run under multiprocessing `spawn`).

Each process opens ONE App with a tiny pool, waits at a barrier so every
process starts together, then runs many asyncio claimers at once. Each claimer
runs the real claim statement until it comes back empty and reports what it got.
"""

from __future__ import annotations

import asyncio
import traceback
from dataclasses import dataclass, field
from typing import Any

from conveyor import App, Config

BARRIER_TIMEOUT_S = 60.0
LEASE_S = 30.0


@dataclass(frozen=True)
class ClaimPlan:
    """What one claimer process does."""

    database_url: str
    process: int
    claimers: int
    pool_size: int
    limits: tuple[int, ...]
    """Claim size of claimer i is `limits[i % len(limits)]`."""


@dataclass
class ClaimReport:
    """What one claimer process saw: `claims[worker_id] = [(job id, lease token), ...]`."""

    process: int
    claims: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def worker_id(process: int, claimer: int) -> str:
    """The worker id a claimer writes into the rows it claims."""
    return f"claimer-p{process}-c{claimer}"


def run_claimers(plan: ClaimPlan, barrier: Any, reports: Any) -> None:
    """Process entry point: put one `ClaimReport` on `reports`."""
    report = ClaimReport(plan.process)
    try:
        asyncio.run(_claim_all(plan, barrier, report))
    except BaseException:
        report.errors.append(traceback.format_exc())
    reports.put(report)


async def _claim_all(plan: ClaimPlan, barrier: Any, report: ClaimReport) -> None:
    # No statement retries: a pool timeout or any failure must surface, not be retried away.
    config = Config(pool_size=plan.pool_size, statement_retries=0)
    app = App(plan.database_url, schema="conveyor", config=config)
    try:
        await app.db.fetch("warm up", "clock_now")  # open the pool before the race
        await asyncio.to_thread(barrier.wait, BARRIER_TIMEOUT_S)
        ids = [worker_id(plan.process, i) for i in range(plan.claimers)]
        limits = [plan.limits[i % len(plan.limits)] for i in range(plan.claimers)]
        outcomes = await asyncio.gather(
            *(_claim_until_empty(app, wid, limit) for wid, limit in zip(ids, limits, strict=True)),
            return_exceptions=True,
        )
        for wid, outcome in zip(ids, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                report.errors.append(f"{wid}: {''.join(traceback.format_exception(outcome))}")
            else:
                report.claims[wid] = outcome
    finally:
        await app.close()


async def _claim_until_empty(app: App, wid: str, limit: int) -> list[tuple[int, int]]:
    got: list[tuple[int, int]] = []
    while True:
        rows = await app.db.fetch(
            "claim",
            "job_claim_many",
            {"queues": ["default"], "limit": limit, "worker_id": wid, "lease_s": LEASE_S},
        )
        if not rows:
            return got
        got += [(int(row["id"]), int(row["lease_token"])) for row in rows]
