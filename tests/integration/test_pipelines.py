"""Pipelines end to end on one worker: data flow along lists and DAGs (fan-out, fan-in,
transitive results), halting on a failed step with statuses persisted and the cleanup run
once, step retries on the fake clock, metadata everywhere, step options on their jobs, and
runs moved on by the database whoever ends a step job."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from conveyor import (
    App,
    Cancel,
    Fail,
    FixedDelay,
    JobContext,
    JobState,
    NotInRun,
    Run,
    RunFailure,
    RunState,
    Step,
    StepState,
    codec,
)
from conveyor.maintenance.rescuer import Rescuer
from conveyor.testing import advance_time, drain, freeze_time
from tests.integration.conftest import QueryDb

FROZEN = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
NO_DELAY = FixedDelay(timedelta(0))


async def test_four_steps_pass_results_along(app: App) -> None:
    calls: list[str] = []
    pipe = app.pipeline("etl")

    @pipe.step()
    async def extract(ctx: JobContext) -> list[int]:
        calls.append("extract")
        return list(range(ctx.run.input["n"]))

    @pipe.step()
    async def transform(ctx: JobContext) -> list[int]:
        calls.append("transform")
        return [x * 2 for x in ctx.run.prev_results["extract"]]

    @pipe.step()
    def validate(ctx: JobContext) -> int:
        calls.append("validate")
        assert set(ctx.run.prev_results) == {"extract", "transform"}
        return len(ctx.run.prev_results["transform"])

    @pipe.step()
    async def load(ctx: JobContext) -> dict[str, Any]:
        calls.append("load")
        return {"sum": sum(ctx.run.prev_results["transform"]), "meta": ctx.run.metadata}

    run = await pipe.start({"n": 4}, metadata={"triggered_by": "test"})
    assert run.state is RunState.RUNNING
    await drain(app)
    done = await app.runs.get(run.id)
    assert done.state is RunState.SUCCEEDED, done
    assert calls == ["extract", "transform", "validate", "load"]
    assert done.results["load"] == {"sum": 12, "meta": {"triggered_by": "test"}}
    assert [s.state for s in done.steps] == [StepState.SUCCEEDED] * 4


async def test_failing_step_halts_and_cleanup_runs_once(app: App) -> None:
    seen: list[RunFailure] = []
    pipe = app.pipeline("halts")

    @pipe.step()
    async def first(ctx: JobContext) -> int:
        return 1

    @pipe.step(max_attempts=2, retry=lambda attempt: __import__("datetime").timedelta(0))
    async def second(ctx: JobContext) -> None:
        raise RuntimeError("boom")

    @pipe.step()
    async def third(ctx: JobContext) -> None:
        raise AssertionError("must never run")

    @pipe.on_failure()
    async def cleanup(ctx: JobContext, failure: RunFailure) -> None:
        seen.append(failure)

    run = await pipe.start(None, metadata={"triggered_by": "cron"})
    await drain(app)
    done = await app.runs.get(run.id)
    assert done.state is RunState.FAILED
    assert done.failed_step == "second"
    assert [s.state for s in done.steps] == [
        StepState.SUCCEEDED,
        StepState.FAILED,
        StepState.SKIPPED,
    ]
    assert len(seen) == 1
    assert seen[0].results == {"first": 1}
    assert seen[0].metadata == {"triggered_by": "cron"}
    assert seen[0].error is not None and seen[0].error["message"] == "boom"


# -- DAGs ------------------------------------------------------------------------


async def test_fan_out_runs_branches_together_and_fan_in_gets_every_ancestor_result(
    app: App, query_db: QueryDb
) -> None:
    started: list[str] = []
    both_branches = asyncio.Event()
    seen: dict[str, Any] = {}

    async def a(ctx: JobContext) -> int:
        return int(ctx.run.input)

    async def branch(ctx: JobContext) -> int:
        assert ctx.run.step is not None
        started.append(ctx.run.step)
        seen[ctx.run.step] = dict(ctx.run.prev_results)
        if len(started) == 2:
            both_branches.set()
        # Both branches must be running at once: each waits for the other.
        await asyncio.wait_for(both_branches.wait(), timeout=10)
        return int(ctx.run.prev_results["a"]) * (2 if ctx.run.step == "b" else 3)

    def d(ctx: JobContext) -> dict[str, Any]:
        seen["d"] = dict(ctx.run.prev_results)
        return {"sum": sum(ctx.run.prev_results.values()), "run": ctx.run.id}

    pipe = app.pipeline(
        "diamond",
        steps=[
            Step(func=a),
            Step(func=branch, name="b", depends_on=["a"]),
            Step(func=branch, name="c", depends_on=["a"]),
            Step(func=d, depends_on=["b", "c"]),
        ],
    )
    run = await pipe.start(10)
    assert [s.state for s in (await app.runs.get(run.id)).steps] == [
        StepState.ENQUEUED,
        StepState.PENDING,
        StepState.PENDING,
        StepState.PENDING,
    ]
    await drain(app)
    done = await app.runs.get(run.id)
    assert done.state is RunState.SUCCEEDED, done
    assert sorted(started) == ["b", "c"]
    assert seen["b"] == seen["c"] == {"a": 10}
    assert seen["d"] == {"a": 10, "b": 20, "c": 30}
    assert done.results == {"a": 10, "b": 20, "c": 30, "d": {"sum": 60, "run": run.id}}
    assert [s.depends_on for s in done.steps] == [[], ["a"], ["a"], ["b", "c"]]
    jobs = await query_db(
        "SELECT id, task, created_at FROM conveyor.jobs WHERE run_id = %s ORDER BY id", run.id
    )
    assert [j["task"] for j in jobs] == ["diamond:a", "diamond:b", "diamond:c", "diamond:d"]
    # b and c were enqueued together, by the transaction that recorded a's end.
    assert jobs[2]["id"] == jobs[1]["id"] + 1
    assert jobs[1]["created_at"] == jobs[2]["created_at"]


async def test_prev_results_hold_transitive_dependencies_only(app: App) -> None:
    seen: dict[str, set[str]] = {}
    pipe = app.pipeline("branches")

    async def record(ctx: JobContext) -> str:
        assert ctx.run.step is not None
        seen[ctx.run.step] = set(ctx.run.prev_results)
        return ctx.run.step

    pipe.step(name="root")(record)
    pipe.step(name="left1", depends_on=["root"])(record)
    pipe.step(name="left2", depends_on=["left1"])(record)
    pipe.step(name="right", depends_on=["root"])(record)
    pipe.step(name="lone", depends_on=[])(record)
    pipe.step(name="join", depends_on=["left2", "lone"])(record)
    run = await pipe.start()
    await drain(app)
    assert (await app.runs.get(run.id)).state is RunState.SUCCEEDED
    assert seen == {
        "root": set(),
        "lone": set(),
        "left1": {"root"},
        "right": {"root"},
        "left2": {"root", "left1"},
        "join": {"root", "left1", "left2", "lone"},
    }


async def test_step_names_starting_with_a_dollar_pass_their_results_on(app: App) -> None:
    """Step names may start with `$`; `prev_results` (one object keyed by step name)
    must not then be decoded as a codec tag."""
    seen: list[Any] = []
    pipe = app.pipeline("dollar_steps")

    @pipe.step(name="$fetch", max_attempts=1)
    async def fetch(ctx: JobContext) -> int:
        return 41

    @pipe.step(max_attempts=1)
    async def use(ctx: JobContext) -> int:
        seen.append(ctx.run.prev_results)
        return int(ctx.run.prev_results["$fetch"]) + 1

    run = await pipe.start()
    await drain(app)
    done = await app.runs.get(run.id)
    assert done.state is RunState.SUCCEEDED, done.step("use").error
    assert seen == [{"$fetch": 41}]


# -- failures and retries -----------------------------------------------------------


async def test_failed_step_persists_statuses_and_later_steps_never_start(
    app: App, query_db: QueryDb
) -> None:
    calls: list[str] = []
    cleanups: list[RunFailure] = []
    pipe = app.pipeline("persisted")

    @pipe.step()
    async def ok(ctx: JobContext) -> dict[str, Any]:
        calls.append("ok")
        return {"amount": Decimal("12.50")}

    @pipe.step(max_attempts=3, retry=NO_DELAY)
    async def broken(ctx: JobContext) -> None:
        calls.append("broken")
        raise ValueError(f"bad attempt {ctx.attempt}")

    @pipe.step()
    async def after(ctx: JobContext) -> None:
        calls.append("after")

    @pipe.step(depends_on=["ok"])
    async def side(ctx: JobContext) -> str:
        calls.append("side")
        return "side done"

    @pipe.on_failure()
    async def cleanup(ctx: JobContext, failure: RunFailure) -> None:
        assert ctx.run.step is None
        cleanups.append(failure)

    run = await pipe.start({"order": 1})
    await drain(app)
    await drain(app)  # nothing left: the cleanup does not run twice
    done = await app.runs.get(run.id)
    assert done.state is RunState.FAILED
    assert done.finished_at is not None
    assert done.failed_step == "broken"
    assert done.error is not None
    assert done.error["type"] == "builtins.ValueError"
    assert done.error["message"] == "bad attempt 3"
    assert done.error["attempt"] == 3
    assert "ValueError" in done.error["traceback"]
    assert calls.count("broken") == 3
    assert "after" not in calls
    states = {s.name: s.state for s in done.steps}
    assert states["ok"] is StepState.SUCCEEDED
    assert states["broken"] is StepState.FAILED
    assert states["after"] is StepState.SKIPPED
    # `side` ran in parallel with `broken` unless the run halted first.
    assert states["side"] in (StepState.SUCCEEDED, StepState.SKIPPED, StepState.CANCELLED)
    broken_step = done.step("broken")
    assert broken_step.attempts == 3
    assert broken_step.job_state == "failed"
    assert broken_step.error is not None and broken_step.error["message"] == "bad attempt 3"
    assert broken_step.finished_at is not None
    assert done.step("after").job_id is None
    assert done.step("after").attempts == 0
    assert done.results["ok"] == {"amount": Decimal("12.50")}
    await _check_cleanup_ran_once(query_db, done, cleanups)


async def _check_cleanup_ran_once(query_db: QueryDb, done: Run, cleanups: list[RunFailure]) -> None:
    assert len(cleanups) == 1
    failure = cleanups[0]
    assert failure.state is RunState.FAILED
    assert failure.failed_step == "broken"
    assert failure.error == done.error
    assert failure.results["ok"] == {"amount": Decimal("12.50")}
    assert failure.input == {"order": 1}
    jobs = await query_db(
        "SELECT id, task, state::text AS state FROM conveyor.jobs WHERE run_id = %s ORDER BY id",
        done.id,
    )
    assert "persisted:after" not in [j["task"] for j in jobs]
    step_tasks = {"persisted:ok", "persisted:broken", "persisted:side"}
    (cleanup_job,) = [j for j in jobs if j["task"] not in step_tasks]
    assert cleanup_job["id"] == done.cleanup_job_id
    assert cleanup_job["state"] == "succeeded"


async def test_failed_run_without_cleanup_enqueues_nothing(app: App, query_db: QueryDb) -> None:
    pipe = app.pipeline("no_cleanup")

    @pipe.step(max_attempts=1)
    async def only(ctx: JobContext) -> None:
        raise RuntimeError("x")

    run = await pipe.start()
    await drain(app)
    done = await app.runs.get(run.id)
    assert done.state is RunState.FAILED
    assert done.cleanup_job_id is None
    assert len(await query_db("SELECT id FROM conveyor.jobs")) == 1


async def test_step_retries_on_its_schedule_then_succeeds_and_the_run_continues(
    app: App,
) -> None:
    calls: list[str] = []
    pipe = app.pipeline("retrying")

    @pipe.step(max_attempts=3, retry=FixedDelay(timedelta(seconds=30)))
    async def flaky(ctx: JobContext) -> str:
        calls.append(f"flaky {ctx.attempt}")
        if ctx.attempt < 3:
            raise RuntimeError("not yet")
        return "finally"

    @pipe.step()
    async def then(ctx: JobContext) -> str:
        calls.append("then")
        return f"after {ctx.run.prev_results['flaky']}"

    await freeze_time(app, FROZEN)
    run = await pipe.start()
    await drain(app)
    waiting = await app.runs.get(run.id)
    assert waiting.state is RunState.RUNNING
    assert waiting.step("flaky").state is StepState.ENQUEUED
    assert waiting.step("flaky").job_state == "scheduled"
    assert waiting.step("flaky").attempts == 1
    assert waiting.step("then").state is StepState.PENDING

    await advance_time(app, timedelta(seconds=29))
    await drain(app)
    assert calls == ["flaky 1"]
    await advance_time(app, timedelta(seconds=1))
    await drain(app)
    assert calls == ["flaky 1", "flaky 2"]
    await advance_time(app, timedelta(seconds=30))
    await drain(app)
    done = await app.runs.get(run.id)
    assert done.state is RunState.SUCCEEDED
    assert calls == ["flaky 1", "flaky 2", "flaky 3", "then"]
    assert done.step("flaky").attempts == 3
    assert done.results == {"flaky": "finally", "then": "after finally"}
    assert done.finished_at == FROZEN + timedelta(seconds=60)


async def test_fail_signal_fails_the_step_without_using_remaining_attempts(app: App) -> None:
    calls: list[int] = []
    pipe = app.pipeline("fail_now")

    @pipe.step(max_attempts=5, retry=NO_DELAY)
    async def refuse(ctx: JobContext) -> None:
        calls.append(ctx.attempt)
        raise Fail("card declined")

    run = await pipe.start()
    await drain(app)
    done = await app.runs.get(run.id)
    assert done.state is RunState.FAILED
    assert calls == [1]
    assert done.step("refuse").attempts == 1
    assert done.error is not None and done.error["message"] == "card declined"


async def test_step_raising_cancel_cancels_the_run_and_runs_cleanup(app: App) -> None:
    seen: list[RunFailure] = []
    pipe = app.pipeline("self_cancel")

    @pipe.step()
    async def first(ctx: JobContext) -> None:
        raise Cancel("nothing to do")

    @pipe.step()
    async def second(ctx: JobContext) -> None:
        raise AssertionError("must not run")

    @pipe.on_failure()
    async def cleanup(ctx: JobContext, failure: RunFailure) -> None:
        seen.append(failure)

    run = await pipe.start()
    await drain(app)
    done = await app.runs.get(run.id)
    assert done.state is RunState.CANCELLED
    assert [s.state for s in done.steps] == [StepState.CANCELLED, StepState.SKIPPED]
    assert len(seen) == 1 and seen[0].state is RunState.CANCELLED


async def test_step_timeout_fails_the_step_and_the_run(app: App) -> None:
    pipe = app.pipeline("slow")

    @pipe.step(max_attempts=1, timeout=0.2)
    async def hangs(ctx: JobContext) -> None:
        await asyncio.Event().wait()

    run = await pipe.start()
    await drain(app)
    done = await app.runs.get(run.id)
    assert done.state is RunState.FAILED
    assert done.error is not None and "timed out" in done.error["message"]


async def test_a_failing_branch_stops_the_running_sibling_and_skips_the_join(app: App) -> None:
    sibling_started = asyncio.Event()
    calls: list[str] = []
    pipe = app.pipeline("branch_failure")

    @pipe.step()
    async def root(ctx: JobContext) -> None:
        return None

    @pipe.step(depends_on=["root"])
    async def waits(ctx: JobContext) -> None:
        calls.append("waits")
        sibling_started.set()
        await asyncio.Event().wait()

    @pipe.step(depends_on=["root"], max_attempts=1)
    async def fails(ctx: JobContext) -> None:
        await asyncio.wait_for(sibling_started.wait(), timeout=10)
        raise RuntimeError("branch failed")

    @pipe.step(depends_on=["waits", "fails"])
    async def join(ctx: JobContext) -> None:
        calls.append("join")

    @pipe.on_failure()
    async def cleanup(ctx: JobContext, failure: RunFailure) -> None:
        calls.append(f"cleanup {failure.failed_step}")

    run = await pipe.start()
    await drain(app)
    done = await app.runs.get(run.id)
    assert done.state is RunState.FAILED
    assert {s.name: s.state for s in done.steps} == {
        "root": StepState.SUCCEEDED,
        "waits": StepState.CANCELLED,
        "fails": StepState.FAILED,
        "join": StepState.SKIPPED,
    }
    assert calls == ["waits", "cleanup fails"]


# -- metadata, context, options ---------------------------------------------------


async def test_metadata_reaches_the_run_every_step_and_the_cleanup(app: App) -> None:
    metadata = {
        "triggered_by": "api",
        "at": datetime(2026, 3, 1, 9, 30, tzinfo=UTC),
        "budget": Decimal("100.00"),
        "tags": ("a", "b"),
    }
    seen: list[tuple[str, Any, Any, int]] = []
    pipe = app.pipeline("meta")

    async def record(ctx: JobContext) -> None:
        seen.append((str(ctx.run.step), ctx.run.metadata, ctx.run.input, ctx.run.id))
        if ctx.run.step == "three":
            raise RuntimeError("to reach the cleanup")

    pipe.step(name="one")(record)
    pipe.step(name="two")(record)
    pipe.step(name="three", max_attempts=1)(record)

    @pipe.on_failure()
    async def cleanup(ctx: JobContext, failure: RunFailure) -> None:
        seen.append(("cleanup", ctx.run.metadata, ctx.run.input, ctx.run.id))
        seen.append(("failure", failure.metadata, failure.input, failure.run_id))

    run = await pipe.start({"n": Decimal("1.5")}, metadata=metadata)
    assert run.metadata == metadata
    await drain(app)
    assert (await app.runs.get(run.id)).metadata == metadata
    assert seen == [
        (name, metadata, {"n": Decimal("1.5")}, run.id)
        for name in ("one", "two", "three", "cleanup", "failure")
    ]
    assert type(seen[0][1]["tags"]) is tuple


async def test_step_jobs_carry_the_step_options(app: App, query_db: QueryDb) -> None:
    pipe = app.pipeline("options")

    @pipe.step(queue="special", priority=7, max_attempts=9, timeout=timedelta(seconds=90))
    async def configured(ctx: JobContext) -> None:
        return None

    @pipe.on_failure(queue="cleanups", priority=-3, max_attempts=2, timeout=5)
    async def cleanup(ctx: JobContext, failure: RunFailure) -> None:
        return None

    run = await pipe.start()
    (job,) = await query_db(
        "SELECT task, queue, priority, max_attempts, timeout_ms, run_id FROM conveyor.jobs"
    )
    assert job == {
        "task": "options:configured",
        "queue": "special",
        "priority": 7,
        "max_attempts": 9,
        "timeout_ms": 90_000,
        "run_id": run.id,
    }
    cancelled = await app.runs.cancel(run.id)
    (cleanup_job,) = await query_db(
        "SELECT queue, priority, max_attempts, timeout_ms FROM conveyor.jobs WHERE id = %s",
        cancelled.cleanup_job_id,
    )
    assert cleanup_job == {
        "queue": "cleanups",
        "priority": -3,
        "max_attempts": 2,
        "timeout_ms": 5000,
    }


async def test_ctx_run_in_a_plain_task_raises_not_in_run(app: App) -> None:
    caught: list[str] = []

    @app.task(name="plain")
    async def plain(ctx: JobContext) -> None:
        with pytest.raises(NotInRun):
            _ = ctx.run
        caught.append("not in run")

    await plain.enqueue()
    await drain(app)
    assert caught == ["not in run"]


async def test_a_step_task_enqueued_outside_a_run_never_runs(app: App) -> None:
    calls: list[str] = []
    pipe = app.pipeline("orphan")

    @pipe.step()
    async def only(ctx: JobContext) -> None:
        calls.append("ran")

    job = await only.enqueue()
    await drain(app)
    assert calls == []
    assert (await app.get_job(job.id)).state is JobState.CANCELLED


async def test_a_step_job_ended_by_any_writer_moves_the_run_on(app: App, query_db: QueryDb) -> None:
    """The database advances runs (trigger on conveyor.jobs), not the worker: a step job
    ended by a bare UPDATE enqueues the next step with that result."""
    seen: list[Any] = []
    pipe = app.pipeline("by_sql")

    @pipe.step()
    async def first(ctx: JobContext) -> None:
        raise AssertionError("ended by SQL, never run")

    @pipe.step()
    async def second(ctx: JobContext) -> str:
        seen.append(ctx.run.prev_results)
        return "second"

    run = await pipe.start()
    first_job = (await app.runs.get(run.id)).step("first").job_id
    await query_db(
        "UPDATE conveyor.jobs SET state = 'succeeded', finished_at = conveyor.now(), "
        "result = %s::jsonb WHERE id = %s",
        codec.dumps({"from": "sql", "d": Decimal("1")}),
        first_job,
    )
    moved = await app.runs.get(run.id)
    assert moved.step("first").state is StepState.SUCCEEDED
    assert moved.step("second").state is StepState.ENQUEUED
    await drain(app)
    assert seen == [{"first": {"from": "sql", "d": Decimal("1")}}]
    assert (await app.runs.get(run.id)).state is RunState.SUCCEEDED


async def test_a_step_rescued_after_its_last_attempt_fails_the_run_and_runs_cleanup(
    app: App, query_db: QueryDb
) -> None:
    calls: list[str] = []
    pipe = app.pipeline("rescued")

    @pipe.step(max_attempts=1)
    async def crashes(ctx: JobContext) -> None:
        raise AssertionError("claimed by a worker that died, never run here")

    @pipe.step()
    async def after(ctx: JobContext) -> None:
        calls.append("after")

    @pipe.on_failure()
    async def cleanup(ctx: JobContext, failure: RunFailure) -> None:
        calls.append(f"cleanup {failure.failed_step} {failure.error and failure.error['type']}")

    await freeze_time(app, FROZEN)
    run = await pipe.start()
    job_id = (await app.runs.get(run.id)).step("crashes").job_id
    # A worker claims the step, then dies: its lease runs out on the database clock.
    await query_db(
        "UPDATE conveyor.jobs SET state = 'running', attempt = 1, worker_id = 'dead', "
        "lease_token = nextval('conveyor.lease_token_seq'), started_at = conveyor.now(), "
        "lease_expires_at = conveyor.now() + interval '20 seconds' WHERE id = %s",
        job_id,
    )
    await advance_time(app, timedelta(minutes=1))
    rescuer = Rescuer(app.db, interval=timedelta(seconds=5), dead_after=timedelta(hours=1))
    report = await rescuer.run_once()
    assert report.rescued == {job_id: "failed"}
    halted = await app.runs.get(run.id)
    assert halted.state is RunState.FAILED
    assert halted.failed_step == "crashes"
    assert [s.state for s in halted.steps] == [StepState.FAILED, StepState.SKIPPED]
    await drain(app)
    assert calls == ["cleanup crashes conveyor.LeaseExpired"]
