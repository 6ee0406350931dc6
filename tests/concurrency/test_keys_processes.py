"""Concurrency keys across worker processes: the limit holds for the whole fleet
(measured by the tasks themselves and by the database), jobs of a key are claimed
in enqueue order whatever each worker's speed, and the persisted counts equal a
recount at every instant of the run."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest

from conveyor import App
from tests.concurrency.procs import (
    KeyCounts,
    StartWorker,
    WorkerProcess,
    counts_differ,
    key_counts,
    query,
    recount,
    snapshot_key_counts,
    wait_until,
)
from tests.concurrency.sample_app import GAUGE_DDL, KEYED, KEYED_LIMIT, WORK_SCALE_ENV
from tests.fifo_checker import fifo_violations, install_fifo_checker

RUN_TIMEOUT_S = 60.0
"""Bound on any wait for jobs to finish; generous for a loaded 2-core machine."""


@pytest.fixture
async def keyed_app(sample_app: App) -> AsyncIterator[App]:
    """The sample app, with the gauge side table the KEYED task counts itself in."""
    await query(sample_app, GAUGE_DDL)
    yield sample_app


@dataclass
class Watch:
    """What the database showed while a run went on, sampled in single snapshots."""

    key: tuple[str, str]
    peak_reported: int = 0
    """Most running jobs `concurrency_keys` reported for the key."""
    peak_recounted: int = 0
    """Most jobs of the key in state running, counted in the jobs table."""
    samples: int = 0
    differences: list[dict[tuple[str, str], object]] = field(default_factory=list)

    async def finished(self, app: App) -> bool:
        """Take one sample; true once the key has nothing waiting or running."""
        stats, recounted = await snapshot_key_counts(app)
        self.samples += 1
        if diff := counts_differ(stats, recounted):
            self.differences.append(diff)
        if self.key not in stats:
            return False
        self.peak_reported = max(self.peak_reported, stats[self.key]["running"])
        self.peak_recounted = max(
            self.peak_recounted, recounted.get(self.key, {}).get("running", 0)
        )
        return stats[self.key]["waiting"] == stats[self.key]["running"] == 0


async def run_until_drained(app: App, key: str, procs: Sequence[WorkerProcess]) -> Watch:
    watch = Watch(("default", key))
    await wait_until(lambda: watch.finished(app), RUN_TIMEOUT_S, f"key {key} drained", procs=procs)
    await asyncio.gather(*(p.stop() for p in procs))
    return watch


async def start_order_violations(app: App, key: str) -> list[tuple[int, int]]:
    """(job, earlier job still waiting and due) pairs seen at the moment `job` was claimed.

    Checked by a trigger at each claim statement (tests/fifo_checker.py), not by
    comparing timestamps, which claims racing across processes cannot order.
    """
    del key  # every keyed job of the test database is checked
    return [(r["job_id"], r["earlier_id"]) for r in await fifo_violations(app)]


async def gauge(app: App, key: str) -> tuple[int, int]:
    """(running now, most ever) as the KEYED tasks counted themselves."""
    rows = await query(app, "SELECT n, peak FROM public.gauge WHERE key = %s", [key])
    return rows[0]["n"], rows[0]["peak"]


async def executions_by_pid(app: App, ids: Sequence[int]) -> Counter[int]:
    rows = await query(app, "SELECT job_id, pid FROM public.executions")
    assert Counter(r["job_id"] for r in rows) == Counter(ids), "a job ran twice or never"
    return Counter(r["pid"] for r in rows)


def expected(key_total: int) -> dict[str, int]:
    return {
        "waiting": 0,
        "running": 0,
        "total_enqueued": key_total,
        "total_succeeded": key_total,
        "total_failed": 0,
        "total_cancelled": 0,
    }


async def assert_final_counts(app: App, key: str, total: int) -> KeyCounts:
    stats = await key_counts(app)
    assert counts_differ(stats, await recount(app)) == {}
    assert stats[("default", key)] == expected(total)
    return stats


async def test_key_limit_and_claim_order_hold_across_three_worker_processes(
    keyed_app: App, start: StartWorker
) -> None:
    app = keyed_app
    await install_fifo_checker(app)
    procs = [start(f"w{i}", concurrency=4) for i in range(3)]
    await asyncio.gather(*(p.wait_ready() for p in procs))
    # Enqueued once every worker listens: 12 slots race for a key that allows 5.
    jobs = await app.enqueue_many(
        app.get_task(KEYED).job(key="hot", n=n, work_s=0.002) for n in range(1_000)
    )
    ids = [j.id for j in jobs]

    watch = await run_until_drained(app, "hot", procs)

    assert watch.differences == []
    assert watch.samples > 1
    assert watch.peak_reported <= KEYED_LIMIT
    assert watch.peak_recounted <= KEYED_LIMIT
    now, peak = await gauge(app, "hot")
    assert now == 0
    assert 2 <= peak <= KEYED_LIMIT, "the tasks saw more (or no) overlap"
    done = await app.get_jobs(ids)
    assert {(j.state, j.attempt) for j in done} == {("succeeded", 1)}
    assert await start_order_violations(app, "hot") == []
    by_pid = await executions_by_pid(app, ids)
    assert set(by_pid) <= {p.pid for p in procs}
    assert len(by_pid) > 1, "one worker did all the work"
    assert sum(p.stats()["stale_writes"] for p in procs) == 0
    (key,) = await app.keys()
    assert key.concurrency_limit == KEYED_LIMIT
    await assert_final_counts(app, "hot", 1_000)


async def test_claim_order_holds_with_workers_of_different_speeds(
    keyed_app: App, start: StartWorker
) -> None:
    app = keyed_app
    await install_fifo_checker(app)
    # The same task takes 0.25x, 1x and 4x its nominal time depending on the worker.
    procs = [
        start(f"w{i}", concurrency=2, env={WORK_SCALE_ENV: scale})
        for i, scale in enumerate(("0.25", "1", "4"))
    ]
    await asyncio.gather(*(p.wait_ready() for p in procs))
    keyed = app.get_task(KEYED).configure(concurrency_limit=2)
    jobs = await app.enqueue_many(keyed.job(key="speeds", n=n, work_s=0.01) for n in range(30))
    ids = [j.id for j in jobs]

    watch = await run_until_drained(app, "speeds", procs)

    assert watch.differences == []
    assert watch.peak_reported <= 2
    assert watch.peak_recounted <= 2
    now, peak = await gauge(app, "speeds")
    assert now == 0
    assert peak <= 2, "the tasks saw more jobs of the key at once than its limit"
    done = await app.get_jobs(ids)
    assert {(j.state, j.attempt) for j in done} == {("succeeded", 1)}
    assert await start_order_violations(app, "speeds") == []
    by_pid = await executions_by_pid(app, ids)
    assert set(by_pid) <= {p.pid for p in procs}
    await assert_final_counts(app, "speeds", 30)
