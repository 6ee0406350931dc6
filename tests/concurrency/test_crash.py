"""Worker processes that die or freeze mid-job: rescue, fencing, and the poison-job bound.

Leases run on the database clock, frozen here and moved by hand, so "the lease
has expired" is a fact the test creates, not a race against the wall clock.
The `executions` side table shows every attempt that really ran; the jobs
table shows what was recorded.
"""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from conveyor import App
from conveyor.testing import advance_time, database_now, freeze_time
from tests.concurrency.procs import (
    StartWorker,
    executions,
    query,
    rescue_once,
    wait_until,
)
from tests.concurrency.sample_app import HOLD, POISON, POISON_MAX_ATTEMPTS, QUICK

T0 = datetime(2031, 3, 1, 9, 0, tzinfo=UTC)
LEASE = timedelta(seconds=10)
HEARTBEAT = timedelta(seconds=1)
RESCUE_INTERVAL = timedelta(milliseconds=500)
FIRST_RESCUE_BACKOFF = timedelta(seconds=1)
"""The rescuer's backoff after attempt 1 (1 s * 2^(attempt - 1))."""
RUN_TIMEOUT_S = 60.0
"""Bound on any wait for a process or a job; generous for a loaded 2-core machine."""
LEASE_EXPIRED = "conveyor.LeaseExpired"


def _timing(lease: timedelta = LEASE, heartbeat: timedelta = HEARTBEAT) -> dict[str, float]:
    return {
        "lease_duration": lease.total_seconds(),
        "heartbeat_interval": heartbeat.total_seconds(),
        "rescue_interval": RESCUE_INTERVAL.total_seconds(),
    }


async def _executed(app: App, job_id: int, times: int) -> bool:
    return len(await executions(app, job_id)) >= times


async def _in_state(app: App, job_id: int, state: str) -> bool:
    return (await app.get_job(job_id)).state == state


async def test_a_job_of_a_killed_worker_is_rescued_within_the_bound_and_completes_once_more(
    sample_app: App, start: StartWorker, tmp_path: Path
) -> None:
    await freeze_time(sample_app, T0)
    gate = tmp_path / "gate-open"
    job = await sample_app.get_task(HOLD).enqueue(gate=str(gate), timeout_s=RUN_TIMEOUT_S)
    doomed = start("doomed", **_timing())
    await doomed.wait_ready()
    await wait_until(
        lambda: _executed(sample_app, job.id, 1), RUN_TIMEOUT_S, "job started", procs=[doomed]
    )
    running = await sample_app.get_job(job.id)
    assert (running.state, running.attempt, running.worker_id) == ("running", 1, doomed.info["id"])
    assert running.lease_expires_at == T0 + LEASE

    doomed.kill()
    assert doomed.popen.returncode == -signal.SIGKILL
    # Nothing was recorded: the job still looks like it runs, on a lease nobody renews.
    assert await sample_app.get_job(job.id) == running

    heir = start("heir", **_timing())
    await heir.wait_ready()
    gate.touch()  # the next attempt may finish; the dead one never will

    # Just short of the lease, no rescuer may take the job: not ours, not the heir's.
    await advance_time(sample_app, LEASE - timedelta(milliseconds=500))
    assert (await rescue_once(sample_app)).rescued == {}
    assert await sample_app.get_job(job.id) == running

    # At lease + rescue interval (the documented bound) the heir's own rescuer has
    # taken it back: the rescue waits only for the heir's next pass.
    bound = T0 + LEASE + RESCUE_INTERVAL
    await advance_time(sample_app, bound - await database_now(sample_app))
    await wait_until(
        lambda: _in_state(sample_app, job.id, "scheduled"),
        RUN_TIMEOUT_S,
        "job rescued",
        procs=[heir],
    )
    rescued = await sample_app.get_job(job.id)
    assert (rescued.attempt, rescued.lease_token, rescued.lease_expires_at) == (1, None, None)
    assert rescued.run_at == bound + FIRST_RESCUE_BACKOFF
    assert [(e["type"], e["attempt"]) for e in rescued.errors] == [(LEASE_EXPIRED, 1)]
    assert datetime.fromisoformat(rescued.errors[0]["at"]) == bound

    # Due once its backoff has passed: the heir runs it, and only the heir's result stands.
    await advance_time(sample_app, FIRST_RESCUE_BACKOFF)
    done = await sample_app.wait(job.id, timeout=RUN_TIMEOUT_S)
    heir_id = heir.info["id"]
    assert (done.state, done.attempt, done.worker_id) == ("succeeded", 2, heir_id)
    assert done.result == {"worker": heir_id, "attempt": 2, "pid": heir.pid}
    assert [(e["type"], e["attempt"]) for e in done.errors] == [(LEASE_EXPIRED, 1)]
    assert await executions(sample_app, job.id) == [
        (1, doomed.pid, doomed.info["id"]),
        (2, heir.pid, heir_id),
    ]
    await heir.stop()
    stats = heir.stats()
    assert (stats["succeeded"], stats["stale_writes"], stats["lease_lost"]) == (1, 0, 0)


async def _zombie_reported(app: App, worker_id: str) -> bool:
    """True once the worker's heartbeat reports it gave up on, or was refused, an attempt."""
    rows = await query(app, "SELECT stats FROM conveyor.workers WHERE id = %s", [worker_id])
    stats = rows[0]["stats"]
    return bool(stats["stale_writes"] + stats["lease_lost"])


@pytest.mark.parametrize(
    ("local_lease", "paused_past_local_lease", "resumed_while_heir_runs"),
    [
        pytest.param(timedelta(seconds=30), False, False, id="after-heir-finished"),
        pytest.param(timedelta(seconds=2), True, False, id="past-local-lease-too"),
        pytest.param(timedelta(seconds=30), False, True, id="while-heir-runs"),
    ],
)
async def test_a_paused_worker_resumed_after_its_lease_cannot_overwrite_the_job(
    sample_app: App,
    start: StartWorker,
    tmp_path: Path,
    local_lease: timedelta,
    paused_past_local_lease: bool,
    resumed_while_heir_runs: bool,
) -> None:
    # Paused past the database lease only, the zombie's own watchdog sees nothing wrong
    # on resume: its attempt completes and only the fenced write stops it, whether the
    # heir has finished the job (state check) or still runs it (lease token check).
    # Paused past its local lease too, it must drop the attempt (watchdog or heartbeat)
    # or, should the attempt win that race, be refused the same way.
    timing = _timing(lease=local_lease, heartbeat=timedelta(milliseconds=500))
    await freeze_time(sample_app, T0)
    gates = {attempt: tmp_path / f"gate-{attempt}" for attempt in (1, 2)}
    job = await sample_app.get_task(HOLD).enqueue(
        gate=str(tmp_path / "gate-{attempt}"), timeout_s=RUN_TIMEOUT_S
    )
    zombie = start("zombie", run_rescuer=False, **timing)
    await zombie.wait_ready()
    await wait_until(
        lambda: _executed(sample_app, job.id, 1), RUN_TIMEOUT_S, "job started", procs=[zombie]
    )

    zombie.pause()
    loop = asyncio.get_running_loop()
    paused_at = loop.time()
    await advance_time(sample_app, local_lease + timedelta(seconds=1))
    assert (await rescue_once(sample_app)).rescued == {job.id: "scheduled"}
    gates[1].touch()  # the zombie's attempt can finish as soon as it runs again
    await advance_time(sample_app, FIRST_RESCUE_BACKOFF)
    heir = start("heir", run_rescuer=False, **timing)
    await heir.wait_ready()
    heir_id = heir.info["id"]
    await wait_until(
        lambda: _executed(sample_app, job.id, 2), RUN_TIMEOUT_S, "heir started", procs=[heir]
    )
    if not resumed_while_heir_runs:
        gates[2].touch()
        await sample_app.wait(job.id, timeout=RUN_TIMEOUT_S)
    before = await sample_app.get_job(job.id)
    assert (before.attempt, before.worker_id) == (2, heir_id)

    async def outlived_local_lease() -> bool:
        return loop.time() - paused_at > local_lease.total_seconds()

    if paused_past_local_lease:
        # The scenario, not a synchronisation: stay frozen past the local lease too.
        await wait_until(outlived_local_lease, RUN_TIMEOUT_S, "the pause to outlive the lease")
    zombie.resume()
    await wait_until(
        lambda: _zombie_reported(sample_app, zombie.info["id"]),
        RUN_TIMEOUT_S,
        "the zombie to act on its stale attempt",
        procs=[zombie],
    )
    await zombie.stop()
    stats = zombie.stats()
    assert stats["stale_writes"] + stats["lease_lost"] == 1, stats
    if not paused_past_local_lease:
        assert (stats["succeeded"], stats["stale_writes"]) == (1, 1), stats

    # The zombie's late completion changed nothing (not even the heir's lease) ...
    assert await sample_app.get_job(job.id) == before
    gates[2].touch()
    # ... and the heir's result is the one that stands.
    done = await sample_app.wait(job.id, timeout=RUN_TIMEOUT_S)
    assert (done.state, done.attempt, done.worker_id) == ("succeeded", 2, heir_id)
    assert done.result == {"worker": heir_id, "attempt": 2, "pid": heir.pid}
    assert [(e["type"], e["attempt"]) for e in done.errors] == [(LEASE_EXPIRED, 1)]
    assert await executions(sample_app, job.id) == [
        (1, zombie.pid, zombie.info["id"]),
        (2, heir.pid, heir_id),
    ]
    await heir.stop()
    assert (heir.stats()["succeeded"], heir.stats()["stale_writes"]) == (1, 0)


async def test_a_job_that_kills_every_worker_it_runs_on_fails_after_max_attempts(
    sample_app: App, start: StartWorker
) -> None:
    await freeze_time(sample_app, T0)
    poison = await sample_app.get_task(POISON).enqueue()
    victims = []
    for attempt in range(1, POISON_MAX_ATTEMPTS + 1):
        victim = start(f"victim{attempt}", run_rescuer=False, **_timing())
        victims.append(victim)
        assert await victim.wait_exit() == -signal.SIGKILL, victim.log()
        orphan = await sample_app.get_job(poison.id)
        assert (orphan.state, orphan.attempt) == ("running", attempt)

        now = await advance_time(sample_app, LEASE + timedelta(seconds=1))
        last = attempt == POISON_MAX_ATTEMPTS
        report = await rescue_once(sample_app)
        assert report.rescued == {poison.id: "failed" if last else "scheduled"}
        if not last:
            backoff = FIRST_RESCUE_BACKOFF * 2 ** (attempt - 1)
            assert (await sample_app.get_job(poison.id)).run_at == now + backoff
            await advance_time(sample_app, backoff)

    failed = await sample_app.get_job(poison.id)
    assert (failed.state, failed.attempt, failed.finished_at) == ("failed", 3, now)
    assert (failed.lease_token, failed.lease_expires_at) == (None, None)
    assert [(e["type"], e["attempt"]) for e in failed.errors] == [
        (LEASE_EXPIRED, n) for n in range(1, POISON_MAX_ATTEMPTS + 1)
    ]
    ran = await executions(sample_app, poison.id)
    assert [(a, pid) for a, pid, _ in ran] == [(n + 1, v.pid) for n, v in enumerate(victims)]

    # It never comes back: a healthy worker runs other work and outlives it.
    quick = await sample_app.get_task(QUICK).enqueue(n=7)
    survivor = start("survivor", **_timing())
    assert (await sample_app.wait(quick.id, timeout=RUN_TIMEOUT_S)).state == "succeeded"
    await survivor.stop()
    assert survivor.stats()["started"] == 1
    assert await sample_app.get_job(poison.id) == failed
    assert len(await executions(sample_app, poison.id)) == POISON_MAX_ATTEMPTS
