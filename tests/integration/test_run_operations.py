"""Operations on runs: cancel (running, unclaimed, waiting, ended, unknown), retry from the
failed step without rerunning succeeded steps, one run at a time per key in start order,
starting inside a caller's transaction, and listing/counting/waiting for runs."""

from __future__ import annotations

import asyncio
import itertools
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from conveyor import (
    App,
    FixedDelay,
    JobContext,
    JobState,
    RunFailure,
    RunNotFound,
    RunNotRetryable,
    RunState,
    StepState,
    WaitTimeout,
)
from conveyor.maintenance.rescuer import Rescuer
from conveyor.pipeline import Pipeline
from conveyor.testing import drain
from tests.integration.conftest import QueryDb

NO_DELAY = FixedDelay(timedelta(0))


async def step_jobs(query_db: QueryDb, run_id: int) -> list[dict[str, Any]]:
    """The run's jobs in id order; a cleanup job (no step's task) reads `cleanup`."""
    return await query_db(
        "SELECT j.id, CASE WHEN j.task IN (SELECT task FROM conveyor.run_steps AS s "
        "WHERE s.run_id = j.run_id) THEN j.task ELSE 'cleanup' END AS task, "
        "j.state::text AS state, j.cancel_requested_at IS NOT NULL AS cancel_asked "
        "FROM conveyor.jobs AS j WHERE j.run_id = %s ORDER BY j.id",
        run_id,
    )


async def claim_by_hand(query_db: QueryDb, job_id: int) -> None:
    """Make a job `running` as if a worker that never reports back had claimed it (moved
    to a queue `drain` does not watch, so draining the others does not wait for it)."""
    await query_db(
        "UPDATE conveyor.jobs SET state = 'running', attempt = attempt + 1, queue = 'ghost', "
        "lease_token = nextval('conveyor.lease_token_seq'), "
        "lease_expires_at = conveyor.now() + interval '1 hour', started_at = conveyor.now(), "
        "worker_id = 'ghost' WHERE id = %s",
        job_id,
    )


# -- cancel --------------------------------------------------------------------


async def test_cancel_of_a_running_step_stops_it_skips_the_rest_and_runs_cleanup_once(
    app: App, query_db: QueryDb
) -> None:
    started = asyncio.Event()
    never = asyncio.Event()
    calls: list[str] = []
    failures: list[RunFailure] = []
    pipe = app.pipeline("cancel_running")

    @pipe.step()
    async def first(ctx: JobContext) -> str:
        calls.append("first")
        return "done"

    @pipe.step()
    async def slow(ctx: JobContext) -> None:
        calls.append("slow")
        started.set()
        await never.wait()

    @pipe.step()
    async def last(ctx: JobContext) -> None:
        calls.append("last")

    @pipe.on_failure()
    async def cleanup(ctx: JobContext, failure: RunFailure) -> None:
        failures.append(failure)

    run = await pipe.start({"order": 7}, metadata={"who": "ops"})
    worker = asyncio.create_task(drain(app))
    await asyncio.wait_for(started.wait(), timeout=10)
    cancelled = await app.runs.cancel(run.id, reason="operator said stop")
    assert cancelled.state is RunState.CANCELLED
    assert cancelled.finished_at is not None
    assert cancelled.step("slow").job_state == "running"
    assert cancelled.step("last").state is StepState.SKIPPED
    assert cancelled.cleanup_job_id is not None
    await worker

    done = await app.runs.get(run.id)
    assert done.state is RunState.CANCELLED
    assert done.failed_step is None
    assert done.error == {"type": "conveyor.RunCancelled", "message": "operator said stop"}
    assert [s.state for s in done.steps] == [
        StepState.SUCCEEDED,
        StepState.CANCELLED,
        StepState.SKIPPED,
    ]
    assert done.step("last").job_id is None
    assert calls == ["first", "slow"]
    assert len(failures) == 1
    failure = failures[0]
    assert failure.run_id == run.id
    assert failure.pipeline == "cancel_running"
    assert failure.state is RunState.CANCELLED
    assert failure.failed_step is None
    assert failure.error == {"type": "conveyor.RunCancelled", "message": "operator said stop"}
    assert failure.results == {"first": "done"}
    assert failure.input == {"order": 7}
    assert failure.metadata == {"who": "ops"}
    jobs = await step_jobs(query_db, run.id)
    assert [(j["task"], j["state"]) for j in jobs] == [
        ("cancel_running:first", "succeeded"),
        ("cancel_running:slow", "cancelled"),
        ("cleanup", "succeeded"),
    ]


async def test_cancel_before_the_first_step_is_claimed_runs_only_the_cleanup(
    app: App, query_db: QueryDb
) -> None:
    calls: list[str] = []
    pipe = app.pipeline("cancel_early")

    @pipe.step()
    async def first(ctx: JobContext) -> None:
        calls.append("first")

    @pipe.step()
    async def second(ctx: JobContext) -> None:
        calls.append("second")

    @pipe.on_failure()
    def cleanup(ctx: JobContext, failure: RunFailure) -> None:
        calls.append(f"cleanup:{failure.state}")

    run = await pipe.start()
    cancelled = await app.runs.cancel(run.id)
    assert cancelled.state is RunState.CANCELLED
    assert cancelled.error == {"type": "conveyor.RunCancelled", "message": "cancelled by request"}
    assert [s.state for s in cancelled.steps] == [StepState.CANCELLED, StepState.SKIPPED]
    await drain(app)
    assert calls == ["cleanup:cancelled"]
    jobs = await step_jobs(query_db, run.id)
    assert [(j["task"], j["state"]) for j in jobs] == [
        ("cancel_early:first", "cancelled"),
        ("cleanup", "succeeded"),
    ]


async def test_cancel_of_an_ended_run_returns_it_unchanged(app: App) -> None:
    calls: list[str] = []
    pipe = app.pipeline("ended")

    @pipe.step()
    async def only(ctx: JobContext) -> int:
        return 1

    @pipe.on_failure()
    async def cleanup(ctx: JobContext, failure: RunFailure) -> None:
        calls.append("cleanup")

    run = await pipe.start()
    await drain(app)
    before = await app.runs.get(run.id)
    after = await app.runs.cancel(run.id)
    assert after == before
    assert after.state is RunState.SUCCEEDED
    assert after.cleanup_job_id is None
    await drain(app)
    assert calls == []


async def test_cancel_and_retry_of_an_unknown_run_raise_run_not_found(app: App) -> None:
    with pytest.raises(RunNotFound):
        await app.runs.cancel(424242)
    with pytest.raises(RunNotFound):
        await app.runs.retry(424242)
    with pytest.raises(RunNotFound):
        await app.runs.get(424242)


async def test_a_step_job_cancelled_directly_cancels_its_run(app: App) -> None:
    pipe, calls = recording_pipeline(app, "job_cancel", ["first", "second"])
    run = await pipe.start()
    first_job = (await app.runs.get(run.id)).step("first").job_id
    assert first_job is not None
    await app.cancel(first_job)
    await drain(app)
    done = await app.runs.get(run.id)
    assert done.state is RunState.CANCELLED
    assert [s.state for s in done.steps] == [StepState.CANCELLED, StepState.SKIPPED]
    assert calls == ["cleanup"]


# -- retry ---------------------------------------------------------------------


def recording_pipeline(app: App, name: str, steps: list[str]) -> tuple[Pipeline, list[str]]:
    """`steps` in a line, each recording its name when called; the cleanup records
    "cleanup"."""
    calls: list[str] = []
    pipe = app.pipeline(name)

    def make(step: str) -> Any:
        async def fn(ctx: JobContext) -> None:
            calls.append(step)

        fn.__name__ = step
        return fn

    for step in steps:
        pipe.step()(make(step))

    @pipe.on_failure()
    async def cleanup(ctx: JobContext, failure: RunFailure) -> None:
        calls.append("cleanup")

    return pipe, calls


def counting_pipeline(
    app: App, name: str, fail_times: dict[str, int]
) -> tuple[Pipeline, list[str]]:
    """a -> b -> c; step `s` fails for good its first `fail_times[s]` executions."""
    calls: list[str] = []
    pipe = app.pipeline(name)

    def make(step: str) -> Any:
        async def fn(ctx: JobContext) -> str:
            calls.append(step)
            if calls.count(step) <= fail_times.get(step, 0):
                raise RuntimeError(f"{step} fails")
            return f"{step}:{sorted(ctx.run.prev_results.items())}"

        fn.__name__ = step
        return fn

    for step in "abc":
        pipe.step(max_attempts=1)(make(step))

    @pipe.on_failure()
    async def cleanup(ctx: JobContext, failure: RunFailure) -> None:
        calls.append(f"cleanup:{failure.failed_step}")

    return pipe, calls


async def test_retry_of_a_failed_run_resumes_at_the_failed_step(
    app: App, query_db: QueryDb
) -> None:
    pipe, calls = counting_pipeline(app, "resume", {"b": 1})
    run = await pipe.start()
    await drain(app)
    failed = await app.runs.get(run.id)
    assert failed.state is RunState.FAILED
    assert failed.failed_step == "b"
    assert calls == ["a", "b", "cleanup:b"]
    old_b_job = failed.step("b").job_id

    retried = await app.runs.retry(run.id)
    assert retried.state is RunState.RUNNING
    assert retried.failed_step is None
    assert retried.error is None
    assert retried.finished_at is None
    assert retried.cleanup_job_id is None
    assert [s.state for s in retried.steps] == [
        StepState.SUCCEEDED,
        StepState.ENQUEUED,
        StepState.PENDING,
    ]
    assert retried.step("b").job_id not in (None, old_b_job)
    assert retried.step("b").error is None

    await drain(app)
    done = await app.runs.get(run.id)
    assert done.state is RunState.SUCCEEDED, done
    assert calls == ["a", "b", "cleanup:b", "b", "c"]
    assert done.results["a"] == "a:[]"
    assert done.results["c"] == "c:[('a', 'a:[]'), ('b', \"b:[('a', 'a:[]')]\")]"
    jobs = await step_jobs(query_db, run.id)
    assert [(j["task"], j["state"]) for j in jobs] == [
        ("resume:a", "succeeded"),
        ("resume:b", "failed"),
        ("cleanup", "succeeded"),
        ("resume:b", "succeeded"),
        ("resume:c", "succeeded"),
    ]


async def test_a_retried_run_that_fails_again_runs_its_cleanup_again(app: App) -> None:
    pipe, calls = counting_pipeline(app, "twice_failed", {"c": 2})
    run = await pipe.start()
    await drain(app)
    await app.runs.retry(run.id)
    await drain(app)
    again = await app.runs.get(run.id)
    assert again.state is RunState.FAILED
    assert calls == ["a", "b", "c", "cleanup:c", "c", "cleanup:c"]
    await app.runs.retry(run.id)
    await drain(app)
    assert (await app.runs.get(run.id)).state is RunState.SUCCEEDED
    assert calls[-1] == "c"
    assert calls.count("a") == calls.count("b") == 1


async def test_retry_of_a_cancelled_run_runs_the_cancelled_and_skipped_steps(app: App) -> None:
    pipe, calls = counting_pipeline(app, "recancel", {})
    run = await pipe.start()
    await app.runs.cancel(run.id)
    await drain(app)
    assert calls == ["cleanup:None"]
    retried = await app.runs.retry(run.id)
    assert retried.state is RunState.RUNNING
    await drain(app)
    done = await app.runs.get(run.id)
    assert done.state is RunState.SUCCEEDED
    assert calls == ["cleanup:None", "a", "b", "c"]


async def test_retry_of_a_running_or_succeeded_run_is_refused(app: App) -> None:
    pipe, _ = counting_pipeline(app, "not_retryable", {})
    run = await pipe.start()
    with pytest.raises(RunNotRetryable, match="running"):
        await app.runs.retry(run.id)
    await drain(app)
    with pytest.raises(RunNotRetryable, match="succeeded"):
        await app.runs.retry(run.id)


async def test_retry_is_refused_while_a_cancelled_step_is_still_running(
    app: App, query_db: QueryDb
) -> None:
    pipe, calls = counting_pipeline(app, "still_running", {})
    run = await pipe.start()
    a_job = (await app.runs.get(run.id)).step("a").job_id
    assert a_job is not None
    await claim_by_hand(query_db, a_job)
    cancelled = await app.runs.cancel(run.id)
    assert cancelled.state is RunState.CANCELLED
    assert (await step_jobs(query_db, run.id))[0]["cancel_asked"] is True
    await drain(app)  # runs the cleanup; the ghost still holds step a
    assert calls == ["cleanup:None"]
    with pytest.raises(RunNotRetryable, match="still to finish"):
        await app.runs.retry(run.id)

    # The ghost worker finally reports the cancellation: now the run can be retried.
    await query_db(
        "UPDATE conveyor.jobs SET state = 'cancelled', finished_at = conveyor.now(), "
        "lease_token = NULL, lease_expires_at = NULL WHERE id = %s",
        a_job,
    )
    assert (await app.runs.get(run.id)).step("a").state is StepState.CANCELLED
    await app.runs.retry(run.id)
    await drain(app)
    assert (await app.runs.get(run.id)).state is RunState.SUCCEEDED
    assert calls == ["cleanup:None", "a", "b", "c"]


async def test_retry_is_refused_until_the_cleanup_of_the_failure_ran(app: App) -> None:
    pipe, calls = counting_pipeline(app, "cleanup_first", {})
    run = await pipe.start()
    await app.runs.cancel(run.id)
    with pytest.raises(RunNotRetryable, match="still to finish"):
        await app.runs.retry(run.id)
    await drain(app)
    assert calls == ["cleanup:None"]
    assert (await app.runs.retry(run.id)).state is RunState.RUNNING


# -- keys ----------------------------------------------------------------------


async def test_runs_sharing_a_key_run_one_at_a_time_in_start_order(app: App) -> None:
    events: list[str] = []
    pipe = app.pipeline("serial")

    @pipe.step()
    async def begin(ctx: JobContext) -> None:
        events.append(f"start {ctx.run.input}")

    @pipe.step()
    async def middle(ctx: JobContext) -> None:
        events.append(f"middle {ctx.run.input}")

    @pipe.step()
    async def end(ctx: JobContext) -> None:
        events.append(f"end {ctx.run.input}")

    runs = [await pipe.start(i, key="customer-1") for i in range(3)]
    assert [r.state for r in runs] == [RunState.RUNNING, RunState.WAITING, RunState.WAITING]
    assert [r.started_at is None for r in runs] == [False, True, True]
    waiting = await app.runs.get(runs[1].id)
    assert all(s.state is StepState.PENDING and s.job_id is None for s in waiting.steps)

    await drain(app)
    assert events == [f"{phase} {i}" for i in range(3) for phase in ("start", "middle", "end")]
    done = await app.runs.get_many([r.id for r in runs])
    assert [r.state for r in done] == [RunState.SUCCEEDED] * 3
    for earlier, later in itertools.pairwise(done):
        assert earlier.finished_at is not None and later.started_at is not None
        assert later.started_at >= earlier.finished_at


async def test_runs_with_different_keys_or_no_key_run_concurrently(app: App) -> None:
    arrived: list[Any] = []
    everyone = asyncio.Event()
    pipe = app.pipeline("parallel_keys")

    @pipe.step()
    async def meet(ctx: JobContext) -> None:
        arrived.append(ctx.run.input)
        if len(arrived) == 3:
            everyone.set()
        await asyncio.wait_for(everyone.wait(), timeout=10)

    runs = [
        await pipe.start("a", key="key-a"),
        await pipe.start("b", key="key-b"),
        await pipe.start("none"),
    ]
    assert [r.state for r in runs] == [RunState.RUNNING] * 3
    await drain(app)
    assert sorted(arrived) == ["a", "b", "none"]
    assert [r.state for r in await app.runs.get_many([r.id for r in runs])] == [
        RunState.SUCCEEDED
    ] * 3


async def test_same_key_in_another_pipeline_does_not_wait(app: App) -> None:
    first = app.pipeline("first_pipe")
    second = app.pipeline("second_pipe")

    async def step(ctx: JobContext) -> None:
        return None

    first.step(name="s")(step)
    second.step(name="s")(step)
    assert (await first.start(key="shared")).state is RunState.RUNNING
    assert (await second.start(key="shared")).state is RunState.RUNNING


async def test_a_failed_or_cancelled_run_hands_its_key_to_the_next_run(app: App) -> None:
    calls: list[Any] = []
    pipe = app.pipeline("handover")

    @pipe.step(max_attempts=1)
    async def work(ctx: JobContext) -> None:
        calls.append(ctx.run.input)
        if ctx.run.input == "fail":
            raise RuntimeError("fails")

    failing = await pipe.start("fail", key="k")
    cancelled = await pipe.start("cancel me", key="k")
    last = await pipe.start("last", key="k")
    assert (await app.runs.cancel(cancelled.id)).state is RunState.CANCELLED
    await drain(app)
    assert calls == ["fail", "last"]
    states = [r.state for r in await app.runs.get_many([failing.id, cancelled.id, last.id])]
    assert states == [RunState.FAILED, RunState.CANCELLED, RunState.SUCCEEDED]


async def test_a_waiting_run_that_is_cancelled_never_starts(app: App) -> None:
    calls: list[Any] = []
    pipe = app.pipeline("waiting_cancel")

    @pipe.step()
    async def work(ctx: JobContext) -> None:
        calls.append(ctx.run.input)

    running = await pipe.start(1, key="k")
    waiting = await pipe.start(2, key="k")
    cancelled = await app.runs.cancel(waiting.id)
    assert cancelled.state is RunState.CANCELLED
    assert [s.state for s in cancelled.steps] == [StepState.SKIPPED]
    await drain(app)
    assert calls == [1]
    assert (await app.runs.get(running.id)).state is RunState.SUCCEEDED


# -- starting in the caller's transaction ------------------------------------------


async def test_start_in_a_rolled_back_transaction_leaves_no_run_and_no_job(
    app: App, database_url: str, query_db: QueryDb
) -> None:
    calls: list[str] = []
    pipe = app.pipeline("tx")

    @pipe.step()
    async def only(ctx: JobContext) -> None:
        calls.append("only")

    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        run = await pipe.start({"x": 1}, key="k", connection=conn)
        assert run.state is RunState.RUNNING
        await conn.rollback()
    assert await query_db("SELECT id FROM conveyor.runs") == []
    assert await query_db("SELECT id FROM conveyor.jobs") == []
    assert await query_db("SELECT run_id FROM conveyor.run_steps") == []
    await drain(app)
    assert calls == []
    # The key was never taken: a new run with it starts at once.
    assert (await pipe.start(key="k")).state is RunState.RUNNING


async def test_start_in_a_committed_transaction_runs_with_the_callers_writes(
    app: App, database_url: str, query_db: QueryDb
) -> None:
    await query_db("CREATE TABLE orders (id int PRIMARY KEY)")
    seen: list[Any] = []
    pipe = app.pipeline("tx_commit")

    @pipe.step()
    async def only(ctx: JobContext) -> None:
        seen.append(await query_db("SELECT id FROM orders"))

    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await conn.execute("INSERT INTO orders VALUES (1)")
        run = await pipe.start(connection=conn)
        await conn.commit()
    await drain(app)
    assert (await app.runs.get(run.id)).state is RunState.SUCCEEDED
    assert seen == [[{"id": 1}]]


async def test_start_sync_creates_a_run(app: App, database_url: str) -> None:
    pipe = app.pipeline("sync_start")

    @pipe.step()
    def only(ctx: JobContext) -> str:
        return f"got {ctx.run.input}"

    run = await asyncio.to_thread(pipe.start_sync, 5, metadata={"via": "sync"})
    assert run.state is RunState.RUNNING
    with psycopg.connect(database_url) as conn:
        rolled_back = pipe.start_sync(6, connection=conn)
        conn.rollback()
    with pytest.raises(RunNotFound):
        await app.runs.get(rolled_back.id)
    await drain(app)
    done = await app.runs.get(run.id)
    assert done.results == {"only": "got 5"}
    assert done.metadata == {"via": "sync"}


# -- reading runs ------------------------------------------------------------------


async def test_recent_counts_and_wait(app: App) -> None:
    pipe, _ = counting_pipeline(app, "listed", {"a": 1})
    other = app.pipeline("other")

    @other.step()
    async def only(ctx: JobContext) -> None:
        return None

    failed = await pipe.start()
    ok = await other.start()
    waiting_line = [await other.start(key="k"), await other.start(key="k")]
    with pytest.raises(WaitTimeout):
        await app.runs.wait(ok.id, timeout=0.05)
    await drain(app)
    assert (await app.runs.wait(ok.id, timeout=5)).state is RunState.SUCCEEDED
    failed_done = await app.runs.wait(failed.id, timeout=timedelta(seconds=5))
    assert failed_done.state is RunState.FAILED
    recent = await app.runs.recent()
    assert [r.id for r in recent] == [waiting_line[1].id, waiting_line[0].id, ok.id, failed.id]
    assert all(r.steps == () for r in recent)
    assert [r.id for r in await app.runs.recent(pipeline="listed")] == [failed.id]
    assert [r.id for r in await app.runs.recent(state="failed")] == [failed.id]
    assert len(await app.runs.recent(limit=2)) == 2
    assert await app.runs.counts() == {"listed": {"failed": 1}, "other": {"succeeded": 3}}


async def test_a_retried_run_whose_key_is_busy_waits_its_turn(app: App) -> None:
    calls: list[Any] = []
    release = asyncio.Event()
    pipe = app.pipeline("retry_in_line")

    @pipe.step(max_attempts=1)
    async def work(ctx: JobContext) -> None:
        calls.append(ctx.run.input)
        if ctx.run.input == "fails once" and calls.count("fails once") == 1:
            raise RuntimeError("first time")
        if ctx.run.input == "holder":
            await asyncio.wait_for(release.wait(), timeout=10)

    failing = await pipe.start("fails once", key="k")
    await drain(app)
    holder = await pipe.start("holder", key="k")
    assert holder.state is RunState.RUNNING
    retried = await app.runs.retry(failing.id)
    assert retried.state is RunState.WAITING
    assert all(s.job_id is None for s in retried.steps)
    worker = asyncio.create_task(drain(app))
    release.set()
    await worker
    assert calls == ["fails once", "holder", "fails once"]
    assert (await app.runs.get(failing.id)).state is RunState.SUCCEEDED
    # Like a freshly started run that has to wait, it had not started while it waited.
    assert retried.started_at is None, f"waiting run reports started_at={retried.started_at}"


async def test_concurrent_starts_with_one_key_start_exactly_one_run(app: App) -> None:
    pipe = app.pipeline("racing_starts")

    @pipe.step()
    async def only(ctx: JobContext) -> Any:
        return ctx.run.input

    runs = await asyncio.gather(*(pipe.start(i, key="same") for i in range(12)))
    assert [r.state for r in runs].count(RunState.RUNNING) == 1
    await drain(app)
    done = await app.runs.get_many([r.id for r in runs])
    assert [r.state for r in done] == [RunState.SUCCEEDED] * 12
    started = sorted(done, key=lambda r: (r.started_at, r.id))
    assert [r.id for r in started] == sorted(r.id for r in done)


async def test_cancel_while_a_step_waits_for_its_retry_cancels_that_job(
    app: App, query_db: QueryDb
) -> None:
    calls: list[str] = []
    pipe = app.pipeline("cancel_scheduled")

    @pipe.step(max_attempts=3, retry=FixedDelay(timedelta(minutes=5)))
    async def flaky(ctx: JobContext) -> None:
        calls.append("flaky")
        raise RuntimeError("later")

    @pipe.on_failure()
    async def cleanup(ctx: JobContext, failure: RunFailure) -> None:
        calls.append(f"cleanup {failure.state}")

    run = await pipe.start()
    await drain(app)
    assert (await app.runs.get(run.id)).step("flaky").job_state == "scheduled"
    cancelled = await app.runs.cancel(run.id)
    assert cancelled.step("flaky").state is StepState.CANCELLED
    assert cancelled.step("flaky").job_state == "cancelled"
    await drain(app)
    assert calls == ["flaky", "cleanup cancelled"]


async def test_a_step_job_claimed_after_its_run_halted_never_calls_the_step(
    app: App, query_db: QueryDb
) -> None:
    pipe, calls = recording_pipeline(app, "late_claim", ["only"])
    run = await pipe.start()
    job_id = (await app.runs.get(run.id)).step("only").job_id
    assert job_id is not None
    await claim_by_hand(query_db, job_id)
    await app.runs.cancel(run.id)
    # A race put the job back in the queue without its cancel request (as a lost
    # outcome write followed by a rescue could): the next claim must still not run it.
    await query_db(
        "UPDATE conveyor.jobs SET state = 'available', queue = 'default', "
        "cancel_requested_at = NULL, lease_token = NULL, lease_expires_at = NULL WHERE id = %s",
        job_id,
    )
    await drain(app)
    assert calls == ["cleanup"]
    job = await app.get_job(job_id)
    assert job.state is JobState.CANCELLED
    done = await app.runs.get(run.id)
    assert done.state is RunState.CANCELLED
    assert done.step("only").state is StepState.CANCELLED


async def test_the_rescuer_starts_a_key_line_left_with_no_running_run(
    app: App, query_db: QueryDb
) -> None:
    calls: list[Any] = []
    pipe = app.pipeline("stranded")

    @pipe.step()
    async def only(ctx: JobContext) -> None:
        calls.append(ctx.run.input)

    first = await pipe.start(1, key="k")
    second = await pipe.start(2, key="k")
    # Something ended the running run behind conveyor's back: the line is stranded.
    await query_db(
        "UPDATE conveyor.runs SET state = 'cancelled', finished_at = conveyor.now() WHERE id = %s",
        first.id,
    )
    await query_db("DELETE FROM conveyor.jobs WHERE run_id = %s", first.id)
    assert (await app.runs.get(second.id)).state is RunState.WAITING
    await Rescuer(app.db, interval=timedelta(seconds=5), dead_after=timedelta(hours=1)).run_once()
    assert (await app.runs.get(second.id)).state is RunState.RUNNING
    await drain(app)
    assert calls == [2]
