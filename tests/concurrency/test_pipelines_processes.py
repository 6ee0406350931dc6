"""Pipelines under real worker processes, crashes and load.

What is proven, with the pipelines of pipeline_app.py:

- Two worker processes run steps of different runs at the same moment (their
  bodies overlap in time, seen in a side table), and runs whose steps hop
  between processes keep their own data: every final result is a pure function
  of its run's input, run state and counters included.
- A worker killed (SIGKILL) inside a step, or right after a step's end was
  recorded, loses nothing: the run resumes on another process and completes;
  the steps that had completed never run again; the `atomic=True` ledger has
  exactly one row per (run, step), even for the interrupted step; and the same
  holds for a worker killed in the middle of a load of DAG runs. A step that
  kills every worker it lands on fails its run after its attempts (halted by
  the rescue), with one cleanup.
- Under load (100 to 200 runs over 3 processes, fan-out/fan-in DAGs, mixed
  success and failure, pools of 2 connections), every run ends, with exactly
  the expected counts, results, ledger rows and cleanups, and no step starts
  before its dependencies' results are committed.
- A branch failing while its siblings run and write run state in other
  processes halts the run once (the join never runs, one cleanup), without
  the halt deadlocking against the siblings' writes and ends; runs cancelled
  mid-flight never start a skipped step, clean up once, and a retry completes
  them without re-running what had succeeded.
- Runs sharing a key never overlap across processes and start in FIFO (id)
  order, also when starts race each other and the ends of running runs.

Leases run on the frozen database clock in the crash tests, so "the lease has
expired" is a fact the test creates; every wait polls the database with a
deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conveyor import App, Run, RunState, StepState, codec
from conveyor.testing import advance_time, freeze_time
from tests.concurrency.pipeline_app import (
    CLEANUP_STEP,
    CRASHY,
    CRASHY_STEPS,
    DAG,
    DAG_DEPENDS_ON,
    DAG_STEPS,
    FANFAIL,
    FANFAIL_SIBLINGS,
    FANFAIL_STEPS,
    HANDOFF,
    HANDOFF_QUEUE,
    HANDOFF_STEPS,
    LEDGER_DDL,
    LIGHT,
    MEET,
    MIXED,
    MIXED_FAIL_ATTEMPTS,
    MIXED_FAILING_STEP,
    MIXED_STEPS,
    POISON_MAX_ATTEMPTS,
    POISONED,
    SERIAL,
    SERIAL_STEPS,
    SLOW,
    SLOW_STEPS,
    STEP_LOG_DDL,
    expected_crashy,
    expected_dag,
    expected_light,
    expected_meet,
    expected_mixed,
    mixed_fails,
)
from tests.concurrency.procs import StartWorker, WorkerProcess, query, rescue_once, wait_until
from tests.concurrency.sample_app import build_app

RUN_TIMEOUT_S = 60.0
"""Bound on any wait for processes or runs; generous for a loaded 2-core machine."""
T0 = datetime(2031, 6, 1, 9, 0, tzinfo=UTC)
LEASE = timedelta(seconds=10)
HEARTBEAT = timedelta(seconds=1)
RESCUE_INTERVAL = timedelta(milliseconds=500)
FIRST_RESCUE_BACKOFF = timedelta(seconds=1)
"""The rescuer's backoff after attempt 1 (1 s * 2^(attempt - 1))."""
LEASE_EXPIRED = "conveyor.LeaseExpired"
TERMINAL = ("succeeded", "failed", "cancelled")
LOG_ALARMS = ("Traceback", " ERROR ", "will retry", "PoolTimeout", "deadlock", "refused")
"""Worker log lines that must not appear in a run where nothing is meant to fail."""

Execution = dict[str, Any]
"""A `step_log` row: run_id, step, job_id, attempt, pid, entered, exited."""


def _timing() -> dict[str, float]:
    return {
        "lease_duration": LEASE.total_seconds(),
        "heartbeat_interval": HEARTBEAT.total_seconds(),
        "rescue_interval": RESCUE_INTERVAL.total_seconds(),
    }


@pytest.fixture
async def app(sample_app: App) -> AsyncIterator[App]:
    """The sample app (which declares the test pipelines), with their side tables."""
    await query(sample_app, STEP_LOG_DDL)
    await query(sample_app, LEDGER_DDL)
    yield sample_app


# -- helpers -------------------------------------------------------------------


async def start_workers(start: StartWorker, count: int, **options: Any) -> list[WorkerProcess]:
    procs = [start(f"w{i}", **options) for i in range(count)]
    await asyncio.gather(*(p.wait_ready() for p in procs))
    return procs


async def start_runs(app: App, pipeline: str, inputs: Iterable[dict[str, Any]]) -> list[Run]:
    """Start one run per input, several at once (the test app's pool bounds them)."""
    pipe = app.pipelines[pipeline]
    return list(await asyncio.gather(*(pipe.start(i) for i in inputs)))


async def ended_count(app: App, ids: Sequence[int]) -> int:
    rows = await query(
        app,
        "SELECT count(*) AS n FROM conveyor.runs WHERE id = ANY(%s) AND state::text = ANY(%s)",
        [list(ids), list(TERMINAL)],
    )
    return int(rows[0]["n"])


async def wait_runs_ended(
    app: App, runs: Sequence[Run], procs: Sequence[WorkerProcess]
) -> list[Run]:
    """Wait until every run ended; return them (with their steps) in input order."""
    ids = [r.id for r in runs]

    async def all_ended() -> bool:
        return await ended_count(app, ids) == len(ids)

    await wait_until(all_ended, RUN_TIMEOUT_S, f"{len(ids)} runs to end", procs=procs)
    return await get_runs(app, ids)


async def get_runs(app: App, ids: Sequence[int]) -> list[Run]:
    """The runs `ids` with their steps, in that order."""
    by_id = {r.id: r for r in await app.runs.get_many(list(ids))}
    return [by_id[i] for i in ids]


async def executions(app: App) -> dict[tuple[int, str], list[Execution]]:
    """Every execution of every step, by (run, step), in the order they entered."""
    rows = await query(app, "SELECT * FROM public.step_log ORDER BY id")
    found: dict[tuple[int, str], list[Execution]] = defaultdict(list)
    for row in rows:
        found[(row["run_id"], row["step"])].append(row)
    return found


async def ledger(app: App) -> Counter[tuple[int, str]]:
    """How many ledger rows each (run, step) wrote."""
    rows = await query(app, "SELECT run_id, step FROM public.ledger")
    return Counter((r["run_id"], r["step"]) for r in rows)


async def ledger_times(app: App) -> dict[tuple[int, str], datetime]:
    rows = await query(app, "SELECT run_id, step, at FROM public.ledger")
    return {(r["run_id"], r["step"]): r["at"] for r in rows}


async def job_errors(app: App, ids: Sequence[int]) -> dict[int, list[tuple[str, int]]]:
    rows = await query(app, "SELECT id, errors FROM conveyor.jobs WHERE id = ANY(%s)", [list(ids)])
    return {r["id"]: [(e["type"], e["attempt"]) for e in r["errors"]] for r in rows}


def pids_of(found: Sequence[Execution]) -> list[int]:
    return [e["pid"] for e in found]


def assert_clean_logs(procs: Iterable[WorkerProcess]) -> None:
    for proc in procs:
        log = proc.log_path.read_text(errors="replace")
        alarms = [line for line in log.splitlines() if any(a in line for a in LOG_ALARMS)]
        assert alarms == [], f"worker {proc.name} logged:\n" + "\n".join(alarms[:20])


async def each_step_ran_once(app: App) -> dict[tuple[int, str], list[Execution]]:
    """Every step's executions; fails naming the attempts, and why their jobs
    ended, if a step ran more than once."""
    found = await executions(app)
    twice = {key: ran for key, ran in found.items() if len(ran) != 1}
    if twice:
        twice_jobs = await job_errors(app, sorted({e["job_id"] for r in twice.values() for e in r}))
        raise AssertionError(f"a step ran twice: {twice}; their jobs' errors: {twice_jobs}")
    return found


async def stop_all(procs: Iterable[WorkerProcess]) -> list[dict[str, Any]]:
    procs = list(procs)
    await asyncio.gather(*(p.stop() for p in procs))
    return [p.stats() for p in procs]


def assert_no_failed_attempts(stats: Iterable[dict[str, Any]]) -> None:
    for s in stats:
        counted = {k: s[k] for k in ("failed", "retried", "cancelled", "lease_lost")}
        assert counted == dict.fromkeys(counted, 0), s
        assert s["stale_writes"] == 0, s


# -- A: processes side by side -------------------------------------------------


async def test_two_worker_processes_run_different_runs_at_once_and_each_run_keeps_its_data(
    app: App, start: StartWorker
) -> None:
    procs = await start_workers(start, 2, concurrency=2)
    pipe = app.pipelines[MEET]
    runs = list(
        await asyncio.gather(
            *(pipe.start({"n": n, "parties": 2}, metadata={"tag": f"run-{n}"}) for n in range(12))
        )
    )
    done = await wait_runs_ended(app, runs, procs)

    for n, run in enumerate(done):
        assert run.state is RunState.SUCCEEDED, run
        assert run.results["finish"] == expected_meet(n)
        assert run.results["meet"] == n
        assert run.data == {"doubled": 2 * n}
        assert run.counters == {"hops": 3}
        assert run.metadata == {"tag": f"run-{n}"}
    found = await executions(app)
    assert sorted(found) == sorted((r.id, s) for r in runs for s in pipe.steps)
    assert all(len(e) == 1 for e in found.values()), "a step ran twice"
    # Two `meet` bodies of different runs, in different processes, overlapped in time.
    meets = [e[0] for (_, step), e in found.items() if step == "meet"]
    overlapping = [
        (x["run_id"], y["run_id"])
        for x in meets
        for y in meets
        if x["pid"] < y["pid"] and x["entered"] < y["exited"] and y["entered"] < x["exited"]
    ]
    assert overlapping, "no two runs were inside their first step at the same time"
    worker_pids = {p.pid for p in procs}
    assert {e[0]["pid"] for e in found.values()} == worker_pids
    hopped = [r.id for r in runs if len({found[(r.id, s)][0]["pid"] for s in pipe.steps}) > 1]
    assert hopped, "no run had its steps spread over both processes"
    assert_no_failed_attempts(await stop_all(procs))


# -- B: crashes ----------------------------------------------------------------


@pytest.mark.parametrize("held", ["s1", "s3"])
async def test_a_worker_killed_inside_a_step_loses_nothing_and_repeats_only_that_step(
    app: App, start: StartWorker, tmp_path: Path, held: str
) -> None:
    await freeze_time(app, T0)
    gate = tmp_path / "gate-{attempt}"
    run = await app.pipelines[CRASHY].start({"n": 5, "hold": held, "gate": str(gate)})
    doomed = start("doomed", run_rescuer=False, **_timing())
    await doomed.wait_ready()

    async def inside_held_step() -> bool:
        return (await ledger(app))[(run.id, held)] == 1

    await wait_until(inside_held_step, RUN_TIMEOUT_S, f"{held} entered", procs=[doomed])
    doomed.kill()
    assert doomed.popen.returncode == -signal.SIGKILL
    held_index = CRASHY_STEPS.index(held)
    before = await app.runs.get(run.id)
    assert before.state is RunState.RUNNING
    assert [s.state for s in before.steps] == (
        [StepState.SUCCEEDED] * held_index
        + [StepState.ENQUEUED]
        + [StepState.PENDING] * (len(CRASHY_STEPS) - held_index - 1)
    )
    held_job = before.step(held).job_id
    assert held_job is not None
    assert before.step(held).job_state == "running"

    heir = start("heir", run_rescuer=False, **_timing())
    await heir.wait_ready()
    Path(str(gate).format(attempt=2)).touch()  # the heir's attempt may go on; the dead one never
    await advance_time(app, LEASE + timedelta(seconds=1))
    assert (await rescue_once(app)).rescued == {held_job: "scheduled"}
    await advance_time(app, FIRST_RESCUE_BACKOFF)
    done = await app.runs.wait(run.id, timeout=RUN_TIMEOUT_S)

    assert done.state is RunState.SUCCEEDED, done
    assert done.results[CRASHY_STEPS[-1]] == expected_crashy(5)
    assert {s.name: s.attempts for s in done.steps} == {
        s: 2 if s == held else 1 for s in CRASHY_STEPS
    }
    assert await job_errors(app, [held_job]) == {held_job: [(LEASE_EXPIRED, 1)]}
    found = await executions(app)
    expected_pids = {
        step: [doomed.pid]
        if i < held_index
        else [doomed.pid, heir.pid]
        if i == held_index
        else [heir.pid]
        for i, step in enumerate(CRASHY_STEPS)
    }
    assert {step: pids_of(found[(run.id, step)]) for step in CRASHY_STEPS} == expected_pids
    assert await ledger(app) == Counter({(run.id, step): 1 for step in CRASHY_STEPS})
    await heir.stop()
    assert heir.stats()["stale_writes"] == 0


async def test_a_worker_killed_right_after_a_step_end_was_recorded_the_run_resumes_elsewhere(
    app: App, start: StartWorker
) -> None:
    # The doomed worker does not claim from the third step's queue: once the second
    # step's end is recorded, the run can only wait, and the kill lands exactly between
    # two steps. The next step was enqueued by the commit that recorded the end.
    run = await app.pipelines[HANDOFF].start({"n": 7})
    doomed = start("doomed", queues=["default"])
    await doomed.wait_ready()

    async def second_step_recorded() -> bool:
        return (await app.runs.get(run.id)).step("b").state is StepState.SUCCEEDED

    await wait_until(second_step_recorded, RUN_TIMEOUT_S, "step b recorded", procs=[doomed])
    doomed.kill()
    between = await app.runs.get(run.id)
    assert [(s.name, s.state, s.job_state) for s in between.steps] == [
        ("a", StepState.SUCCEEDED, "succeeded"),
        ("b", StepState.SUCCEEDED, "succeeded"),
        ("c", StepState.ENQUEUED, "available"),
        ("d", StepState.PENDING, None),
    ]
    assert between.step("c").queue == HANDOFF_QUEUE

    heir = start("heir", queues=["default", HANDOFF_QUEUE])
    done = await app.runs.wait(run.id, timeout=RUN_TIMEOUT_S)

    assert done.state is RunState.SUCCEEDED, done
    assert done.results["d"] == expected_crashy(7)
    found = await executions(app)
    assert {s: pids_of(found[(run.id, s)]) for s in HANDOFF_STEPS} == {
        "a": [doomed.pid],
        "b": [doomed.pid],
        "c": [heir.pid],
        "d": [heir.pid],
    }
    assert await ledger(app) == Counter({(run.id, s): 1 for s in HANDOFF_STEPS})
    assert {s.attempts for s in done.steps} == {1}
    await heir.stop()
    assert_no_failed_attempts([heir.stats()])


async def steps_flushed_at_the_kill(app: App, jobs: set[int]) -> set[tuple[int, str]]:
    """Jobs running at the kill that were not rescued: an outcome batch the frozen
    worker had already sent committed after they were read. Prove they ended
    normally, and return their steps (completed at the kill, never run again)."""
    if not jobs:
        return set()
    rows = await query(
        app,
        "SELECT j.state::text AS state, s.run_id, s.name FROM conveyor.jobs AS j"
        " JOIN conveyor.run_steps AS s ON s.job_id = j.id WHERE j.id = ANY(%s)",
        [list(jobs)],
    )
    assert {r["state"] for r in rows} == {"succeeded"}, rows
    return {(r["run_id"], r["name"]) for r in rows}


async def test_a_worker_killed_during_a_load_of_dag_runs_loses_no_step_and_repeats_none_done(
    app: App, start: StartWorker
) -> None:
    await freeze_time(app, T0)
    doomed = start("doomed", run_rescuer=False, concurrency=4, **_timing())
    survivor = start("survivor", run_rescuer=False, concurrency=4, **_timing())
    procs = [doomed, survivor]
    await asyncio.gather(*(p.wait_ready() for p in procs))
    runs = await start_runs(app, DAG, ({"n": n, "work_s": 0.02} for n in range(30)))
    doomed_id = doomed.info["id"]

    async def doomed_frozen_inside_a_step() -> bool:
        """Freeze the doomed worker; keep it frozen once it is inside a step's body
        with some of the load done, else let it go on."""
        if sum((await ledger(app)).values()) < 40:
            return False
        doomed.pause()
        rows = await query(
            app,
            "SELECT 1 FROM conveyor.jobs AS j JOIN public.step_log AS l ON l.job_id = j.id"
            " WHERE j.state = 'running' AND j.worker_id = %s AND l.pid = %s"
            " AND l.exited IS NULL",
            [doomed_id, doomed.pid],
        )
        if not rows:
            doomed.resume()
        return bool(rows)

    await wait_until(doomed_frozen_inside_a_step, RUN_TIMEOUT_S, "doomed mid-step", procs=procs)
    doomed.kill()
    done_at_kill = {
        (r["run_id"], r["name"])
        for r in await query(
            app,
            "SELECT run_id, name FROM conveyor.run_steps WHERE state = 'succeeded'"
            " AND run_id = ANY(%s)",
            [[r.id for r in runs]],
        )
    }
    orphans = {
        r["id"]
        for r in await query(
            app,
            "SELECT id FROM conveyor.jobs WHERE state = 'running' AND worker_id = %s",
            [doomed_id],
        )
    }
    assert orphans

    # Expire the dead worker's leases only: first let the survivor renew its own past
    # the point the clock is moved to, then move it past the dead worker's.
    renewed_from = await advance_time(app, LEASE - timedelta(seconds=4))

    async def survivor_renewed() -> bool:
        rows = await query(
            app,
            "SELECT count(*) AS n FROM conveyor.jobs WHERE state = 'running'"
            " AND worker_id <> %s AND lease_expires_at < %s",
            [doomed_id, renewed_from + LEASE],
        )
        return int(rows[0]["n"]) == 0

    await wait_until(survivor_renewed, RUN_TIMEOUT_S, "survivor leases renewed", procs=[survivor])
    await advance_time(app, timedelta(seconds=5))
    rescued = (await rescue_once(app)).rescued
    assert rescued and set(rescued) <= orphans and set(rescued.values()) == {"scheduled"}
    done_at_kill |= await steps_flushed_at_the_kill(app, orphans - set(rescued))
    orphans = set(rescued)
    await advance_time(app, FIRST_RESCUE_BACKOFF)
    done = await wait_runs_ended(app, runs, [survivor])

    for n, run in enumerate(done):
        assert run.state is RunState.SUCCEEDED, run
        assert run.results == expected_dag(n)
    every_step = {(r.id, s) for r in runs for s in DAG_STEPS}
    assert await ledger(app) == Counter(dict.fromkeys(every_step, 1))
    found = await executions(app)
    assert set(found) == every_step
    assert done_at_kill, "the kill came before any step was recorded"
    repeated_done = [k for k in done_at_kill if len(found[k]) != 1]
    assert repeated_done == [], "steps recorded before the kill ran again"
    run_of_job = {e["job_id"]: key for key, ran in found.items() for e in ran}
    for key, ran in found.items():
        if len(ran) > 1:
            assert ran[-1]["job_id"] in orphans, key
            assert pids_of(ran) == [doomed.pid] + [survivor.pid] * (len(ran) - 1), key
    assert {run_of_job[j] for j in orphans} <= every_step - done_at_kill
    errors = await job_errors(app, sorted(orphans))
    assert errors == {j: [(LEASE_EXPIRED, 1)] for j in orphans}
    await survivor.stop()
    assert survivor.stats()["stale_writes"] == 0


async def test_a_step_that_kills_every_worker_fails_its_run_after_max_attempts_and_cleans_up(
    app: App, start: StartWorker
) -> None:
    await freeze_time(app, T0)
    run = await app.pipelines[POISONED].start({"n": 3})
    victims = []
    for attempt in range(1, POISON_MAX_ATTEMPTS + 1):
        victim = start(f"victim{attempt}", run_rescuer=False, **_timing())
        victims.append(victim)
        assert await victim.wait_exit() == -signal.SIGKILL, victim.log()
        boom = (await app.runs.get(run.id)).step("boom")
        assert (boom.state, boom.job_state, boom.attempts) == (
            StepState.ENQUEUED,
            "running",
            attempt,
        )
        await advance_time(app, LEASE + timedelta(seconds=1))
        last = attempt == POISON_MAX_ATTEMPTS
        # The rescue that fails the step halts the run in its own transaction.
        assert (await rescue_once(app)).rescued == {boom.job_id: "failed" if last else "scheduled"}
        if not last:
            await advance_time(app, FIRST_RESCUE_BACKOFF * 2 ** (attempt - 1))

    halted = await app.runs.get(run.id)
    assert halted.state is RunState.FAILED
    assert halted.failed_step == "boom"
    assert halted.error is not None and halted.error["type"] == LEASE_EXPIRED
    assert [s.state for s in halted.steps] == [
        StepState.SUCCEEDED,
        StepState.FAILED,
        StepState.SKIPPED,
    ]
    assert halted.cleanup_job_id is not None
    survivor = start("survivor", run_rescuer=False, **_timing())
    await wait_until(
        lambda: _jobs_ended(app, [halted.cleanup_job_id or 0]),
        RUN_TIMEOUT_S,
        "cleanup",
        procs=[survivor],
    )
    report = (await cleanup_results(app, [halted]))[run.id]
    assert (report["state"], report["failed_step"], report["results"]) == (
        "failed",
        "boom",
        {"ok": 3},
    )
    found = await executions(app)
    assert {k[1]: pids_of(v) for k, v in found.items()} == {
        "ok": [victims[0].pid],
        "boom": [v.pid for v in victims],
        CLEANUP_STEP: [survivor.pid],
    }
    assert await ledger(app) == Counter({(run.id, s): 1 for s in ("ok", "boom", CLEANUP_STEP)})
    await survivor.stop()
    assert_no_failed_attempts([survivor.stats()])


# -- B: load -------------------------------------------------------------------


async def test_a_hundred_runs_over_three_processes_all_succeed_with_their_own_results(
    app: App, start: StartWorker
) -> None:
    procs = await start_workers(start, 3)
    runs = await start_runs(app, LIGHT, ({"n": n} for n in range(100)))
    done = await wait_runs_ended(app, runs, procs)

    assert (await app.runs.counts())[LIGHT] == {"succeeded": 100}
    for n, run in enumerate(done):
        assert run.state is RunState.SUCCEEDED, run
        assert run.results["l3"] == expected_light(n)
        assert run.data == {"tenfold": 10 * n}
        assert run.counters == {"steps": 2}
    assert await ledger(app) == Counter({(r.id, s): 1 for r in runs for s in ("l2", "l3")})
    rows = await query(
        app,
        "SELECT DISTINCT worker_id FROM conveyor.jobs WHERE run_id = ANY(%s)",
        [[r.id for r in runs]],
    )
    assert len(rows) > 1, "one process did all the work"
    assert_no_failed_attempts(await stop_all(procs))
    assert_clean_logs(procs)


async def test_fifty_dag_runs_fan_out_and_in_with_every_step_once_and_after_its_dependencies(
    app: App, start: StartWorker
) -> None:
    procs = await start_workers(start, 3)
    runs = await start_runs(app, DAG, ({"n": n} for n in range(50)))
    done = await wait_runs_ended(app, runs, procs)

    for n, run in enumerate(done):
        assert run.state is RunState.SUCCEEDED, run
        assert run.results == expected_dag(n)
        assert {s.attempts for s in run.steps} == {1}
    every_step = {(r.id, s) for r in runs for s in DAG_STEPS}
    assert await ledger(app) == Counter(dict.fromkeys(every_step, 1))
    found = await executions(app)
    assert set(found) == every_step
    assert all(len(e) == 1 for e in found.values()), "a step ran twice"
    # A step starts only after its dependencies' work committed (their ledger rows).
    written = await ledger_times(app)
    early = [
        (run.id, step, dep)
        for run in runs
        for step in DAG_STEPS
        for dep in DAG_DEPENDS_ON[step]
        if not written[(run.id, dep)] < found[(run.id, step)][0]["entered"]
    ]
    assert early == []
    # The fan-out really ran in parallel somewhere: siblings of a run overlapped.
    overlapped = [
        run.id
        for run in runs
        if _overlap(found[(run.id, "b")][0], found[(run.id, "c")][0])
        or _overlap(found[(run.id, "c")][0], found[(run.id, "d")][0])
        or _overlap(found[(run.id, "b")][0], found[(run.id, "d")][0])
    ]
    assert overlapped, "no fan-out siblings ever ran at the same time"
    assert_no_failed_attempts(await stop_all(procs))
    assert_clean_logs(procs)


def _overlap(x: Execution, y: Execution) -> bool:
    return bool(x["entered"] < y["exited"] and y["entered"] < x["exited"])


async def test_mixed_success_and_failure_give_exact_counts_and_one_cleanup_per_failed_run(
    app: App, start: StartWorker
) -> None:
    procs = await start_workers(start, 3)
    inputs = range(120)
    runs = await start_runs(app, MIXED, ({"n": n} for n in inputs))
    done = await wait_runs_ended(app, runs, procs)

    failing = {runs[n].id for n in inputs if mixed_fails(n)}
    assert len(failing) == 30
    assert (await app.runs.counts())[MIXED] == {"failed": 30, "succeeded": 90}
    found = await executions(app)
    cleanups = {r.cleanup_job_id: r for r in done if r.cleanup_job_id is not None}
    assert {r.id for r in cleanups.values()} == failing
    # Every cleanup job has ended before the cleanup rows are read.
    await wait_until(
        lambda: _jobs_ended(app, list(cleanups)), RUN_TIMEOUT_S, "cleanups", procs=procs
    )
    cleanup_results = {
        r["id"]: codec.decode(r["result"])
        for r in await query(
            app,
            "SELECT id, state::text AS state, result FROM conveyor.jobs WHERE id = ANY(%s)"
            " AND state = 'succeeded'",
            [list(cleanups)],
        )
    }
    assert set(cleanup_results) == set(cleanups), "a cleanup did not succeed"
    for n, run in zip(inputs, done, strict=True):
        steps = [s.state for s in run.steps]
        if run.id not in failing:
            assert run.state is RunState.SUCCEEDED, run
            assert run.results["s5"] == expected_mixed(n)
            assert steps == [StepState.SUCCEEDED] * 5
            assert all(len(found[(run.id, s)]) == 1 for s in MIXED_STEPS)
            assert (run.id, CLEANUP_STEP) not in found
            continue
        assert run.state is RunState.FAILED, run
        assert run.failed_step == MIXED_FAILING_STEP
        assert steps == [StepState.SUCCEEDED] * 2 + [StepState.FAILED] + [StepState.SKIPPED] * 2
        assert run.step(MIXED_FAILING_STEP).attempts == MIXED_FAIL_ATTEMPTS
        assert len(found[(run.id, MIXED_FAILING_STEP)]) == MIXED_FAIL_ATTEMPTS
        assert [(run.id, s) in found for s in MIXED_STEPS] == [True] * 3 + [False] * 2
        assert len(found[(run.id, CLEANUP_STEP)]) == 1
        assert run.cleanup_job_id is not None
        assert cleanup_results[run.cleanup_job_id] == {
            "run_id": run.id,
            "state": "failed",
            "failed_step": MIXED_FAILING_STEP,
            "error": f"input {n} fails at {MIXED_FAILING_STEP}",
            "results": {"s1": n + 1, "s2": n + 2},
            "input": {"n": n},
            "metadata": {},
        }
    written = await ledger(app)
    assert written == Counter(
        {(run.id, s): 1 for run in runs for s in MIXED_STEPS if (run.id, s) in found}
        | {(run_id, CLEANUP_STEP): 1 for run_id in failing}
    )
    # Only the failing step's attempts were retried, and nothing else failed.
    stats = await stop_all(procs)
    assert sum(s["failed"] for s in stats) == 30
    assert sum(s["retried"] for s in stats) == 30 * (MIXED_FAIL_ATTEMPTS - 1)
    assert sum(s["stale_writes"] + s["lease_lost"] + s["cancelled"] for s in stats) == 0


async def _jobs_ended(app: App, ids: Sequence[int]) -> bool:
    rows = await query(
        app,
        "SELECT count(*) AS n FROM conveyor.jobs WHERE id = ANY(%s) AND state::text = ANY(%s)",
        [list(ids), list(TERMINAL)],
    )
    return int(rows[0]["n"]) == len(ids)


async def test_two_hundred_runs_on_workers_with_two_pooled_connections_end_without_errors(
    app: App, start: StartWorker
) -> None:
    procs = await start_workers(start, 3, pool_size=2)
    runs = await start_runs(app, LIGHT, ({"n": n} for n in range(200)))
    done = await wait_runs_ended(app, runs, procs)

    assert (await app.runs.counts())[LIGHT] == {"succeeded": 200}
    for n, run in enumerate(done):
        assert run.results["l3"] == expected_light(n), run
    rows = await query(
        app,
        "SELECT count(*) AS n FROM conveyor.jobs WHERE run_id IS NOT NULL"
        " AND (state <> 'succeeded' OR attempt <> 1 OR errors <> '[]')",
    )
    assert rows[0]["n"] == 0
    assert await ledger(app) == Counter({(r.id, s): 1 for r in runs for s in ("l2", "l3")})
    assert_no_failed_attempts(await stop_all(procs))
    assert_clean_logs(procs)


async def run_jobs_ended(app: App, run_ids: Sequence[int]) -> bool:
    """True once every job of these runs (steps being cancelled, cleanups) has ended."""
    rows = await query(
        app,
        "SELECT count(*) AS n FROM conveyor.jobs WHERE run_id = ANY(%s)"
        " AND NOT state::text = ANY(%s)",
        [list(run_ids), list(TERMINAL)],
    )
    return int(rows[0]["n"]) == 0


async def steps_disagreeing_with_their_jobs(app: App, run_ids: Sequence[int]) -> list[Any]:
    """Steps whose state is not their (ended) job's state."""
    return await query(
        app,
        "SELECT s.run_id, s.name, s.state::text AS step, j.state::text AS job"
        " FROM conveyor.run_steps AS s JOIN conveyor.jobs AS j ON j.id = s.job_id"
        " WHERE s.run_id = ANY(%s) AND s.state::text <> j.state::text",
        [list(run_ids)],
    )


async def cleanup_results(app: App, runs: Iterable[Run]) -> dict[int, Any]:
    """Run id -> the result of its cleanup job, for the runs whose cleanup succeeded."""
    by_job = {r.cleanup_job_id: r.id for r in runs if r.cleanup_job_id is not None}
    rows = await query(
        app,
        "SELECT id, result FROM conveyor.jobs WHERE id = ANY(%s) AND state = 'succeeded'",
        [list(by_job)],
    )
    return {by_job[r["id"]]: codec.decode(r["result"]) for r in rows}


async def test_a_branch_failing_beside_running_siblings_halts_its_run_once_without_deadlock(
    app: App, start: StartWorker
) -> None:
    # p fails while q and w, often in other processes, write run state and counters:
    # the halt, the siblings' writes and their ends all lock the same run and jobs.
    procs = await start_workers(start, 3, concurrency=4)
    inputs = [
        {"n": n, "fail": n % 2 == 0, "p_work_s": 0.02, "writes": 4, "pause_s": 0.005}
        for n in range(40)
    ]
    runs = await start_runs(app, FANFAIL, inputs)
    ids = [r.id for r in runs]
    await wait_runs_ended(app, runs, procs)
    await wait_until(lambda: run_jobs_ended(app, ids), RUN_TIMEOUT_S, "jobs ended", procs=procs)
    done = await get_runs(app, ids)

    assert await steps_disagreeing_with_their_jobs(app, ids) == []
    found = await each_step_ran_once(app)
    reports = await cleanup_results(app, done)
    for spec, run in zip(inputs, done, strict=True):
        n = spec["n"]
        states = {s.name: s.state for s in run.steps}
        assert list(states) == list(FANFAIL_STEPS)
        if not spec["fail"]:
            assert run.state is RunState.SUCCEEDED, run
            assert run.results["j"] == 3 * n + 1
            assert run.counters == {"writes": 8}
            assert set(run.data) == {f"{s}{i}" for s in FANFAIL_SIBLINGS for i in range(4)}
            assert run.cleanup_job_id is None
            continue
        assert run.state is RunState.FAILED, run
        assert run.failed_step == "p"
        assert (states["r"], states["p"], states["j"]) == (
            StepState.SUCCEEDED,
            StepState.FAILED,
            StepState.SKIPPED,
        )
        assert {states[s] for s in FANFAIL_SIBLINGS} <= {StepState.SUCCEEDED, StepState.CANCELLED}
        assert (run.id, "j") not in found
        assert len(found[(run.id, CLEANUP_STEP)]) == 1
        report = reports[run.id]
        assert (report["state"], report["failed_step"], report["error"]) == (
            "failed",
            "p",
            f"input {n} fails at p",
        )
        results = report["results"]
        assert results["r"] == n
        assert set(results) <= {"r", *FANFAIL_SIBLINGS}
        assert set(results.values()) == {n}
    written = await ledger(app)
    assert set(written.values()) == {1}
    succeeded_steps = {(r.id, s.name) for r in done for s in r.steps if s.state == "succeeded"}
    assert succeeded_steps <= set(written)
    assert {k for k in written if k[1] == CLEANUP_STEP} == {
        (r.id, CLEANUP_STEP) for r in done if r.state is RunState.FAILED
    }
    stats = await stop_all(procs)
    assert sum(s["leaked"] + s["stale_writes"] + s["lease_lost"] for s in stats) == 0, stats
    # The halt (run row, then the siblings' job rows) must not deadlock with the
    # siblings' own ends and run-state writes (their job row, then the run row).
    deadlocks = [
        line
        for proc in procs
        for line in proc.log_path.read_text(errors="replace").splitlines()
        if "deadlock detected" in line
    ]
    assert deadlocks == [], "\n".join(deadlocks)
    assert_clean_logs(procs)


async def test_runs_cancelled_mid_flight_stop_for_good_clean_up_once_and_retry_to_completion(
    app: App, start: StartWorker
) -> None:
    procs = await start_workers(start, 3, concurrency=3)
    runs = await start_runs(app, SLOW, ({"n": n, "work_s": 0.03} for n in range(30)))
    ids = [r.id for r in runs]
    victims = {r.id for r in runs[::3]}

    async def some_progress() -> bool:
        return sum((await ledger(app)).values()) >= 20

    await wait_until(some_progress, RUN_TIMEOUT_S, "some steps done", procs=procs)
    await asyncio.gather(*(app.runs.cancel(i) for i in victims))
    await wait_runs_ended(app, runs, procs)
    await wait_until(lambda: run_jobs_ended(app, ids), RUN_TIMEOUT_S, "jobs ended", procs=procs)
    done = await get_runs(app, ids)

    assert await steps_disagreeing_with_their_jobs(app, ids) == []
    found = await each_step_ran_once(app)
    reports = await cleanup_results(app, done)
    cancelled = [r for r in done if r.state is RunState.CANCELLED]
    assert {r.id for r in cancelled} <= victims
    assert cancelled, "every victim finished before its cancel"
    for run in done:
        if run.state is RunState.SUCCEEDED:
            assert run.results["t4"] == run.input["n"] + 3
            assert run.cleanup_job_id is None
            continue
        assert run.state is RunState.CANCELLED, run
        assert run.failed_step is None
        assert run.error is not None and run.error["type"] == "conveyor.RunCancelled"
        assert [s.name for s in run.steps] == list(SLOW_STEPS)
        # Steps done, then the step enqueued when the cancel committed (it may still
        # have succeeded, or been cancelled), then the steps that never started.
        states = [s.state for s in run.steps]
        rest = list(itertools.dropwhile(lambda s: s is StepState.SUCCEEDED, states))
        rest = rest[1:] if rest[:1] == [StepState.CANCELLED] else rest
        assert rest == [StepState.SKIPPED] * len(rest), states
        for step in run.steps:
            if step.state is StepState.SKIPPED:
                assert (run.id, step.name) not in found, "a skipped step ran"
        assert len(found[(run.id, CLEANUP_STEP)]) == 1
        assert reports[run.id]["state"] == "cancelled"
        assert reports[run.id]["failed_step"] is None

    # Retried, the cancelled runs run only what did not succeed, and complete.
    succeeded_before = {
        (r.id, s.name) for r in cancelled for s in r.steps if s.state == "succeeded"
    }
    await asyncio.gather(*(app.runs.retry(r.id) for r in cancelled))
    again = await wait_runs_ended(app, cancelled, procs)
    for run in again:
        assert run.state is RunState.SUCCEEDED, run
        assert run.results["t4"] == run.input["n"] + 3
    found_after = await executions(app)
    assert {k: len(found_after[k]) for k in succeeded_before} == dict.fromkeys(succeeded_before, 1)
    await stop_all(procs)
    assert_clean_logs(procs)


# -- B: one run per key --------------------------------------------------------


def key_line(runs: Sequence[Run], found: dict[tuple[int, str], list[Execution]]) -> list[int]:
    """The runs of one key in the order they really ran (by their steps' bodies);
    fails if a step ran twice or two runs of the key overlapped in time."""
    spans = []
    for run in runs:
        ran = [found[(run.id, s)] for s in SERIAL_STEPS]
        assert all(len(e) == 1 for e in ran), f"a step of run {run.id} ran twice"
        spans.append((min(e[0]["entered"] for e in ran), max(e[0]["exited"] for e in ran), run.id))
    spans.sort()
    overlaps = [(a[2], b[2]) for a, b in itertools.pairwise(spans) if not a[1] < b[0]]
    assert overlaps == [], "runs of one key overlapped"
    return [run_id for _, _, run_id in spans]


def assert_one_after_another(runs: Sequence[Run]) -> None:
    """The database's view: each run of a key started once the one before it ended."""
    for earlier, later in itertools.pairwise(sorted(runs, key=lambda r: r.id)):
        assert earlier.finished_at is not None and later.started_at is not None
        assert earlier.finished_at <= later.started_at, (earlier.id, later.id)


async def test_runs_sharing_a_key_never_overlap_across_processes_and_start_in_fifo_order(
    app: App, start: StartWorker
) -> None:
    pipe = app.pipelines[SERIAL]
    # All started before any worker runs: the first runs, the other nine wait in line.
    runs = [await pipe.start({"n": n, "work_s": 0.01}, key="tenant-1") for n in range(10)]
    assert [r.state for r in runs] == [RunState.RUNNING] + [RunState.WAITING] * 9
    procs = await start_workers(start, 3, concurrency=3)
    done = await wait_runs_ended(app, runs, procs)

    assert {r.state for r in done} == {RunState.SUCCEEDED}
    found = await executions(app)
    assert key_line(done, found) == [r.id for r in runs], "not FIFO"
    assert_one_after_another(done)
    pids = {e[0]["pid"] for e in found.values()}
    assert len(pids) > 1, "one process ran every run"
    assert_no_failed_attempts(await stop_all(procs))


async def test_keyed_runs_started_concurrently_while_runs_end_run_one_at_a_time_in_id_order(
    app: App, start: StartWorker, database_url: str
) -> None:
    # Starts race each other and the ends of the keys' running runs; no rescuer runs,
    # so a run left waiting with nothing of its key running would never start.
    procs = await start_workers(start, 3, concurrency=3, run_rescuer=False)
    starter = build_app(database_url, pool_size=8)
    try:
        pipe = starter.pipelines[SERIAL]
        specs = [(f"tenant-{n % 3}", n) for n in range(36)]
        runs = list(
            await asyncio.gather(
                *(pipe.start({"n": n, "work_s": 0.005}, key=key) for key, n in specs)
            )
        )
    finally:
        await starter.close()
    done = await wait_runs_ended(app, runs, procs)

    assert {r.state for r in done} == {RunState.SUCCEEDED}
    found = await executions(app)
    for key in {key for key, _ in specs}:
        of_key = [r for r in done if r.key == key]
        assert len(of_key) == 12
        assert key_line(of_key, found) == sorted(r.id for r in of_key), f"{key} not FIFO"
        assert_one_after_another(of_key)
    assert_no_failed_attempts(await stop_all(procs))
