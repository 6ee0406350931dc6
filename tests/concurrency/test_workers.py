"""Several worker processes on one database: each job runs once, work is shared, NOTIFY wakes."""

from __future__ import annotations

import asyncio
from collections import Counter

from conveyor import App
from tests.concurrency.procs import StartWorker, all_in_state, query, wait_until
from tests.concurrency.sample_app import QUICK, RECORD, RENDEZVOUS

RUN_TIMEOUT_S = 60.0
"""Bound on any wait for jobs to finish; generous for a loaded 2-core machine."""


async def test_worker_processes_share_the_jobs_and_run_each_exactly_once(
    sample_app: App, start: StartWorker
) -> None:
    procs = [start(f"w{i}", concurrency=5) for i in range(3)]
    await asyncio.gather(*(p.wait_ready() for p in procs))
    # Enqueued once every worker listens, so all of them race for the batch.
    jobs = await sample_app.enqueue_many(sample_app.get_task(RECORD).job(n=i) for i in range(300))
    ids = [j.id for j in jobs]

    await wait_until(
        lambda: all_in_state(sample_app, ids, "succeeded"),
        RUN_TIMEOUT_S,
        "all jobs succeeded",
        procs=procs,
    )
    await asyncio.gather(*(p.stop() for p in procs))

    executions = await query(sample_app, "SELECT job_id, pid, worker_id FROM public.executions")
    runs = Counter(row["job_id"] for row in executions)
    assert [job_id for job_id, n in runs.items() if n != 1] == []
    assert set(runs) == set(ids)
    pids = {row["pid"] for row in executions}
    assert pids <= {p.pid for p in procs}
    assert len(pids) > 1, "one worker did all the work"
    # The recorded worker of each job is the process that executed it.
    done = {j.id: j for j in await sample_app.get_jobs(ids)}
    assert all(done[row["job_id"]].worker_id == row["worker_id"] for row in executions)
    assert all(done[i].attempt == 1 for i in ids)
    assert sum(p.stats()["succeeded"] for p in procs) == len(ids)
    assert sum(p.stats()["stale_writes"] for p in procs) == 0


async def test_two_worker_processes_run_different_jobs_at_the_same_time(
    sample_app: App, start: StartWorker
) -> None:
    # With one slot each, a job that waits for the other to start can only
    # finish if the two jobs run simultaneously in the two processes.
    procs = [start(f"w{i}", concurrency=1) for i in range(2)]
    await asyncio.gather(*(p.wait_ready() for p in procs))
    jobs = await sample_app.enqueue_many(
        sample_app.get_task(RENDEZVOUS).job(parties=2, timeout_s=RUN_TIMEOUT_S) for _ in range(2)
    )

    done = [await sample_app.wait(j.id, timeout=RUN_TIMEOUT_S) for j in jobs]
    await asyncio.gather(*(p.stop() for p in procs))

    assert [(j.state, j.attempt) for j in done] == [("succeeded", 1)] * 2
    assert {j.result for j in done} == {p.pid for p in procs}
    assert len({j.worker_id for j in done}) == 2


async def test_notify_wakes_an_idle_worker_long_before_its_poll(
    sample_app: App, start: StartWorker
) -> None:
    # Polling every 30 s: only the insert trigger's NOTIFY can start these jobs in time.
    proc = start("listener", concurrency=2, poll_interval=30.0)
    await proc.wait_ready()
    quick = sample_app.get_task(QUICK)

    first = await quick.enqueue(n=1)
    assert (await sample_app.wait(first.id, timeout=10)).state == "succeeded"
    # Asleep again after that job; a second enqueue wakes it again.
    second = await quick.enqueue(n=2)
    assert (await sample_app.wait(second.id, timeout=10)).state == "succeeded"
    # Enqueued in a caller's transaction: the wake-up comes with the commit.
    async with sample_app.db.connection() as conn:
        async with conn.transaction():
            third = await quick.configure(connection=conn).enqueue(n=3)
        assert (await sample_app.wait(third.id, timeout=10)).state == "succeeded"

    proc.check_alive()
    await proc.stop()
