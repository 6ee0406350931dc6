"""SIGTERM to a worker process with jobs in flight: finish within grace, else give them back."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from conveyor import App
from tests.concurrency.procs import StartWorker, all_in_state, query, state_counts, wait_until
from tests.concurrency.sample_app import GATE, QUICK, RECORD, SPIN

RUN_TIMEOUT_S = 60.0
GATE_TIMEOUT_S = 120.0
"""Longer than any test runs: a gate job only ends when the test opens its gate."""


async def test_sigterm_returns_jobs_still_running_after_the_grace_period(
    sample_app: App, start: StartWorker, tmp_path: Path
) -> None:
    gate = tmp_path / "gate-open"
    held = await sample_app.enqueue_many(
        sample_app.get_task(GATE).job(path=str(gate), timeout_s=GATE_TIMEOUT_S) for _ in range(3)
    )
    quick = await sample_app.enqueue_many(sample_app.get_task(QUICK).job(n=i) for i in range(20))
    held_ids, quick_ids = [j.id for j in held], [j.id for j in quick]
    worker = start("first", concurrency=5, shutdown_grace=0.5)

    async def held_running_and_quick_done() -> bool:
        return await all_in_state(sample_app, held_ids, "running") and await all_in_state(
            sample_app, quick_ids, "succeeded"
        )

    await wait_until(
        held_running_and_quick_done, RUN_TIMEOUT_S, "held jobs running", procs=[worker]
    )
    worker.terminate()
    assert await worker.wait_exit() == 0, worker.log()

    assert await all_in_state(sample_app, quick_ids, "succeeded")
    for job in await sample_app.get_jobs(held_ids):
        assert (job.state, job.attempt, job.lease_token, job.lease_expires_at, job.errors) == (
            "available",
            0,
            None,
            None,
            [],
        )
    assert await query(sample_app, "SELECT id FROM conveyor.jobs WHERE state = 'running'") == []
    stats = worker.stats()
    assert (stats["returned"], stats["succeeded"], stats["stale_writes"]) == (3, 20, 0)

    # The returned jobs are claimed again by the next worker and finish there.
    gate.touch()
    second = start("second", concurrency=5)
    await wait_until(
        lambda: all_in_state(sample_app, held_ids, "succeeded"),
        RUN_TIMEOUT_S,
        "returned jobs succeeded",
        procs=[second],
    )
    await second.stop()
    again = await sample_app.get_jobs(held_ids)
    assert {(j.attempt, j.worker_id) for j in again} == {(1, second.stats()["worker_id"])}
    assert await state_counts(sample_app, held_ids + quick_ids) == {"succeeded": 23}


async def test_sigterm_lets_jobs_that_finish_within_the_grace_period_succeed(
    sample_app: App, start: StartWorker, tmp_path: Path
) -> None:
    gate = tmp_path / "gate-open"
    jobs = await sample_app.enqueue_many(
        sample_app.get_task(GATE).job(path=str(gate), timeout_s=GATE_TIMEOUT_S) for _ in range(4)
    )
    ids = [j.id for j in jobs]
    worker = start("graceful", concurrency=5, shutdown_grace=GATE_TIMEOUT_S)
    await wait_until(
        lambda: all_in_state(sample_app, ids, "running"),
        RUN_TIMEOUT_S,
        "jobs running",
        procs=[worker],
    )

    worker.terminate()
    await worker.wait_stopping()  # the worker is shutting down ...
    gate.touch()  # ... before its jobs can finish
    assert await worker.wait_exit() == 0, worker.log()

    done = await sample_app.get_jobs(ids)
    assert {(j.state, j.attempt, j.lease_token) for j in done} == {("succeeded", 1, None)}
    stats = worker.stats()
    assert (stats["succeeded"], stats["returned"]) == (4, 0)


async def test_sigterm_asks_sync_tasks_to_stop_and_returns_their_jobs(
    sample_app: App, start: StartWorker
) -> None:
    # The sync task only returns once it sees ctx.cancelled; if the stop request
    # never reached its thread, the process could not exit within the bound.
    jobs = await sample_app.enqueue_many(
        sample_app.get_task(SPIN).job(timeout_s=GATE_TIMEOUT_S) for _ in range(2)
    )
    ids = [j.id for j in jobs]
    worker = start("sync", concurrency=2, shutdown_grace=0.5)
    await wait_until(
        lambda: all_in_state(sample_app, ids, "running"),
        RUN_TIMEOUT_S,
        "sync jobs running",
        procs=[worker],
    )

    worker.terminate()
    assert await worker.wait_exit() == 0, worker.log()

    for job in await sample_app.get_jobs(ids):
        assert (job.state, job.attempt, job.lease_token, job.errors) == ("available", 0, None, [])
    assert worker.stats()["returned"] == 2


async def test_stopping_one_worker_mid_stream_loses_and_repeats_no_job(
    sample_app: App, start: StartWorker
) -> None:
    procs = [start(f"w{i}", concurrency=5) for i in range(2)]
    await asyncio.gather(*(p.wait_ready() for p in procs))
    jobs = await sample_app.enqueue_many(sample_app.get_task(RECORD).job(n=i) for i in range(400))
    ids = [j.id for j in jobs]

    async def some_done() -> bool:
        return (await state_counts(sample_app, ids)).get("succeeded", 0) >= 50

    await wait_until(some_done, RUN_TIMEOUT_S, "50 jobs succeeded", procs=procs)
    stopped, survivor = procs
    await stopped.stop()
    await wait_until(
        lambda: all_in_state(sample_app, ids, "succeeded"),
        RUN_TIMEOUT_S,
        "all jobs succeeded",
        procs=[survivor],
    )
    await survivor.stop()

    executions = await query(sample_app, "SELECT job_id FROM public.executions")
    runs = Counter(row["job_id"] for row in executions)
    assert [job_id for job_id, n in runs.items() if n != 1] == []
    assert set(runs) == set(ids)
    assert all(j.attempt == 1 for j in await sample_app.get_jobs(ids))
    stats = [p.stats() for p in procs]
    assert sum(s["succeeded"] for s in stats) == len(ids)
    assert sum(s["stale_writes"] + s["returned"] for s in stats) == 0


async def test_a_job_given_back_at_shutdown_wakes_an_idle_worker_at_once(
    sample_app: App, start: StartWorker, tmp_path: Path
) -> None:
    gate = tmp_path / "gate-open"
    job = await sample_app.get_task(GATE).enqueue(path=str(gate), timeout_s=GATE_TIMEOUT_S)
    leaving = start("leaving", concurrency=1, shutdown_grace=0.5)
    await wait_until(
        lambda: all_in_state(sample_app, [job.id], "running"),
        RUN_TIMEOUT_S,
        "job running",
        procs=[leaving],
    )
    # Polls every 30 s and found nothing at start: only a NOTIFY can wake it in time.
    idle = start("idle", concurrency=1, poll_interval=30.0)
    await idle.wait_ready()

    await leaving.stop()
    gate.touch()

    done = await sample_app.wait(job.id, timeout=10)
    assert (done.state, done.attempt, done.worker_id) == ("succeeded", 1, idle.info["id"])
    await idle.stop()
