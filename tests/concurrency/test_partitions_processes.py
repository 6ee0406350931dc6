"""Partitions made and unmade while worker processes run: no job lost, none run twice.

Creating or removing a task's partition moves its jobs between tables while
other processes claim, run and finish them. The moves must be invisible:
every job runs exactly once, a keyed task keeps its FIFO order and its limit,
and the counts stay equal to a recount.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter

from conveyor import App, JobSpec
from tests.concurrency.procs import (
    REPO_ROOT,
    StartWorker,
    counts_differ,
    query,
    snapshot_key_counts,
    wait_until,
)
from tests.concurrency.sample_app import GAUGE_DDL, KEYED, KEYED_LIMIT, RECORD
from tests.fifo_checker import fifo_violations, install_fifo_checker

RUN_TIMEOUT_S = 120.0
"""Bound on the waits below; generous for a loaded 2-core machine."""
WAVE = 1_500
CREATORS = 4


async def _done(app: App) -> int:
    rows = await query(app, "SELECT count(*) AS n FROM conveyor.jobs WHERE state = 'succeeded'")
    return int(rows[0]["n"])


async def _waiting(app: App, task: str) -> int:
    rows = await query(
        app,
        "SELECT count(*) AS n FROM conveyor.jobs"
        " WHERE task = %s AND state IN ('scheduled', 'available')",
        [task],
    )
    return int(rows[0]["n"])


async def test_partitions_created_and_removed_under_load_lose_no_job_and_run_none_twice(
    sample_app: App, start: StartWorker
) -> None:
    app = sample_app
    await query(app, GAUGE_DDL)
    await install_fifo_checker(app)
    procs = [start(f"w{i}", concurrency=8) for i in range(2)]
    await asyncio.gather(*(p.wait_ready() for p in procs))

    def wave(first: int) -> list[JobSpec]:
        return [app.get_task(RECORD).job(n=first + i) for i in range(WAVE)] + [
            app.get_task(KEYED).job(key="fifo", n=first + i) for i in range(WAVE // 5)
        ]

    async def progressed(target: int) -> None:
        await wait_until(
            lambda: _done_at_least(app, target), RUN_TIMEOUT_S, f"{target} done", procs=procs
        )

    ids: list[int] = []
    ids += [j.id for j in await app.enqueue_many(wave(0))]
    await progressed(200)
    # Both tasks still have waiting jobs to move while the workers take them.
    assert await _waiting(app, RECORD) > 0 and await _waiting(app, KEYED) > 0
    await app.partitions.create(RECORD)
    await app.partitions.create(KEYED)
    ids += [j.id for j in await app.enqueue_many(wave(10_000))]
    await progressed(len(ids) // 2)
    assert await _waiting(app, RECORD) > 0
    assert await app.partitions.remove(RECORD)
    ids += [j.id for j in await app.enqueue_many(wave(20_000))]
    await progressed(len(ids) - WAVE)
    assert await app.partitions.remove(KEYED)

    await wait_until(lambda: _done_at_least(app, len(ids)), RUN_TIMEOUT_S, "all done", procs=procs)
    await asyncio.gather(*(p.stop() for p in procs))

    runs = Counter(r["job_id"] for r in await query(app, "SELECT job_id FROM public.executions"))
    assert sorted(runs) == sorted(ids)
    assert set(runs.values()) == {1}
    assert await fifo_violations(app) == []
    (peak,) = await query(app, "SELECT peak FROM public.gauge WHERE key = 'fifo'")
    assert peak["peak"] <= KEYED_LIMIT
    assert counts_differ(*await snapshot_key_counts(app)) == {}
    assert sum(p.stats()["stale_writes"] for p in procs) == 0
    assert await app.partitions.all() == []


async def _running_on(app: App, worker_id: str) -> list[int]:
    rows = await query(
        app,
        "SELECT id FROM conveyor.jobs WHERE state = 'running' AND worker_id = %s ORDER BY id",
        [worker_id],
    )
    return [row["id"] for row in rows]


async def _settled_running_on(app: App, worker_id: str) -> list[int]:
    """The jobs a paused worker holds, once statements it sent before it froze have
    ended (two reads alike, and none of its jobs changing state between them)."""
    seen: list[object] = []

    async def settled() -> bool:
        rows = await query(
            app,
            "SELECT id, state::text AS state FROM conveyor.jobs WHERE worker_id = %s ORDER BY id",
            [worker_id],
        )
        seen.append(rows)
        return len(seen) > 1 and seen[-1] == seen[-2]

    await wait_until(settled, RUN_TIMEOUT_S, "the paused worker's jobs settle")
    return await _running_on(app, worker_id)


async def test_jobs_of_a_worker_killed_while_they_move_partitions_are_rescued_from_there(
    sample_app: App, start: StartWorker
) -> None:
    app = sample_app
    await query(app, GAUGE_DDL)
    # Short leases: the survivor's rescuer takes the dead worker's jobs back soon.
    timing = {"lease_duration": 2.0, "heartbeat_interval": 0.5, "rescue_interval": 0.5}
    doomed, survivor = start("doomed", concurrency=8, **timing), start("survivor", **timing)
    await asyncio.gather(doomed.wait_ready(), survivor.wait_ready())
    ids = [
        j.id
        for j in await app.enqueue_many(
            [app.get_task(RECORD).job(n=i) for i in range(WAVE)]
            + [app.get_task(KEYED).job(key="fifo", n=i) for i in range(WAVE // 5)]
        )
    ]
    procs = [doomed, survivor]

    async def doomed_holds_jobs() -> bool:
        return bool(await _running_on(app, doomed.info["id"]))

    await wait_until(doomed_holds_jobs, RUN_TIMEOUT_S, "doomed runs jobs", procs=procs)
    doomed.pause()  # frozen mid-run, holding leases on jobs that are about to move
    held = await _settled_running_on(app, doomed.info["id"])
    assert held
    await app.partitions.create(RECORD)
    await app.partitions.create(KEYED)
    doomed.kill()
    ids += [
        j.id for j in await app.enqueue_many(app.get_task(RECORD).job(n=-i) for i in range(300))
    ]
    await wait_until(
        lambda: _done_at_least(app, len(ids)), RUN_TIMEOUT_S, "all done", procs=[survivor]
    )
    await survivor.stop()

    runs = Counter(r["job_id"] for r in await query(app, "SELECT job_id FROM public.executions"))
    assert sorted(runs) == sorted(ids)
    # Only what the dead worker held may have run twice: once there, once rescued.
    assert {job_id for job_id, n in runs.items() if n > 1} <= set(held)
    assert set(runs.values()) <= {1, 2}
    rescued = {job.id: job for job in await app.get_jobs(held)}
    assert all(job.state == "succeeded" and job.attempt == 2 for job in rescued.values())
    assert all(job.worker_id == survivor.info["id"] for job in rescued.values())
    homes = await query(
        app,
        "SELECT DISTINCT tableoid::regclass::text AS t FROM conveyor.jobs WHERE id = ANY(%s)",
        [held],
    )
    assert {h["t"] for h in homes} <= {
        f"conveyor.{i.table_name}" for i in await app.partitions.all()
    }
    assert counts_differ(*await snapshot_key_counts(app)) == {}
    assert survivor.stats()["stale_writes"] == 0


async def _done_at_least(app: App, target: int) -> bool:
    return await _done(app) >= target


async def test_concurrent_creators_of_one_partition_make_it_once(
    sample_app: App, database_url: str
) -> None:
    await sample_app.enqueue_many(sample_app.get_task(RECORD).job(n=i) for i in range(2_000))
    command = [
        sys.executable, "-m", "conveyor", "partitions", "create", RECORD,
        "--database-url", database_url, "--schema", "conveyor",
    ]  # fmt: skip
    creators = [
        await asyncio.create_subprocess_exec(
            *command,
            cwd=REPO_ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        for _ in range(CREATORS)
    ]
    outputs = await asyncio.wait_for(
        asyncio.gather(*(c.communicate() for c in creators)), RUN_TIMEOUT_S
    )
    printed = [out.decode().strip() for out, _ in outputs]
    assert [c.returncode for c in creators] == [0] * CREATORS, printed
    assert len(set(printed)) == 1, printed

    (info,) = await sample_app.partitions.all()
    assert printed[0] == f"{RECORD}: partition {info.table_name}"
    children = await query(
        sample_app,
        "SELECT inhrelid::regclass::text AS t FROM pg_inherits"
        " WHERE inhparent = 'conveyor.jobs'::regclass ORDER BY 1",
    )
    assert [c["t"] for c in children] == sorted(
        ["conveyor.jobs_default", f"conveyor.{info.table_name}"]
    )
    homes = await query(
        sample_app, "SELECT DISTINCT tableoid::regclass::text AS t FROM conveyor.jobs"
    )
    assert homes == [{"t": f"conveyor.{info.table_name}"}]
