"""Enqueueing against a real PostgreSQL: stored fields, scheduling, batches, bad input."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conveyor import (
    App,
    Config,
    DatabaseError,
    InvalidArguments,
    InvalidJobOptions,
    JobSpec,
    JobState,
    PayloadTooLarge,
    RateLimit,
    Task,
    TaskNotFound,
)
from conveyor.enqueue_plan import INSERT_CHUNK
from conveyor.testing import database_now, freeze_time
from tests.integration.conftest import CountJobs, QueryDb

FROZEN = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def register_echo(app: App) -> Task:
    @app.task(name="echo", queue="echoes", priority=1, max_attempts=2)
    async def echo(ctx: object, i: int = 0, text: str = "") -> int:
        return i

    return echo


async def test_enqueue_stores_one_job_with_its_fields(app: App) -> None:
    echo = register_echo(app)
    await freeze_time(app, FROZEN)
    job = await echo.configure(
        queue="custom", priority=7, max_attempts=4, meta={"trace": "abc"}
    ).enqueue(i=1, text="hi")

    stored = await app.get_job(job.id)
    assert stored == job
    assert stored.task == "echo"
    assert stored.queue == "custom"
    assert stored.priority == 7
    assert stored.max_attempts == 4
    assert stored.args == {"i": 1, "text": "hi"}
    assert stored.meta == {"trace": "abc"}
    assert stored.state is JobState.AVAILABLE
    assert stored.attempt == 0
    assert stored.run_at == stored.created_at == FROZEN
    assert stored.errors == []
    assert stored.result is None
    assert stored.lease_token is None
    assert stored.started_at is None
    assert stored.finished_at is None


async def test_enqueue_uses_the_task_defaults(app: App) -> None:
    echo = register_echo(app)
    job = await echo.enqueue(i=1)
    assert (job.queue, job.priority, job.max_attempts) == ("echoes", 1, 2)
    assert job.meta == {}


async def test_enqueue_with_timeout_stores_milliseconds(app: App) -> None:
    @app.task(name="limited", timeout=timedelta(seconds=2))
    async def limited(ctx: object) -> None: ...

    assert (await limited.enqueue()).timeout_ms == 2_000
    job = await limited.configure(timeout=timedelta(milliseconds=250)).enqueue()
    assert job.timeout_ms == 250


async def test_enqueue_with_delay_is_scheduled_on_the_database_clock(app: App) -> None:
    echo = register_echo(app)
    await freeze_time(app, FROZEN)
    job = await echo.configure(delay=timedelta(minutes=5)).enqueue()
    assert job.state is JobState.SCHEDULED
    assert job.run_at == await database_now(app) + timedelta(minutes=5)
    assert job.created_at == FROZEN


async def test_enqueue_with_zero_delay_is_available(app: App) -> None:
    echo = register_echo(app)
    job = await echo.configure(delay=timedelta(0)).enqueue()
    assert job.state is JobState.AVAILABLE


async def test_enqueue_with_run_at_in_the_past_is_available_at_that_time(app: App) -> None:
    echo = register_echo(app)
    await freeze_time(app, FROZEN)
    past = FROZEN - timedelta(hours=1)
    job = await echo.configure(run_at=past).enqueue()
    assert job.state is JobState.AVAILABLE
    assert job.run_at == past


async def test_enqueue_with_run_at_in_the_future_is_scheduled(app: App) -> None:
    echo = register_echo(app)
    await freeze_time(app, FROZEN)
    later = FROZEN + timedelta(days=1)
    job = await echo.configure(run_at=later).enqueue()
    assert job.state is JobState.SCHEDULED
    assert job.run_at == later


async def test_enqueue_by_task_name_through_the_app(app: App) -> None:
    register_echo(app)
    job = await app.enqueue("echo", {"i": 3}, priority=9)
    assert (job.task, job.args, job.priority) == ("echo", {"i": 3}, 9)


async def test_enqueue_many_returns_ids_in_input_order(app: App) -> None:
    echo = register_echo(app)

    @app.task(name="other", queue="elsewhere")
    def other(ctx: object, i: int) -> None: ...

    specs = [(echo if i % 3 else other).configure(priority=i % 5).job(i=i) for i in range(50)]
    jobs = await app.enqueue_many(specs)
    assert [j.args["i"] for j in jobs] == list(range(50))
    assert [j.task for j in jobs] == [s.task for s in specs]
    ids = [j.id for j in jobs]
    assert ids == sorted(ids)
    assert len(set(ids)) == 50


async def test_enqueue_many_of_nothing_is_a_no_op(app: App, count_jobs: CountJobs) -> None:
    assert await app.enqueue_many([]) == []
    assert await count_jobs() == 0


async def test_enqueue_many_is_all_or_nothing_on_bad_input(app: App, count_jobs: CountJobs) -> None:
    echo = register_echo(app)
    good = [echo.job(i=i) for i in range(5)]
    bad = JobSpec(task="echo", args={"i": object()})
    with pytest.raises(InvalidArguments):
        await app.enqueue_many([*good, bad, *good])
    with pytest.raises(TaskNotFound):
        await app.enqueue_many([*good, JobSpec(task="nope")])
    with pytest.raises(InvalidArguments):
        await app.enqueue_many([*good, JobSpec(task="echo", args={"nope": 1})])
    assert await count_jobs() == 0


async def test_enqueue_many_across_insert_chunks_is_one_transaction(
    app: App, count_jobs: CountJobs, query_db: QueryDb
) -> None:
    echo = register_echo(app)
    total = 2 * INSERT_CHUNK + 2_000
    jobs = await app.enqueue_many(echo.job(i=i) for i in range(total))

    assert len(jobs) == total
    assert [j.args["i"] for j in jobs] == list(range(total))
    assert await count_jobs() == total
    # Every row carries the id of the one transaction that wrote it.
    rows = await query_db("SELECT count(DISTINCT xmin::text) AS n FROM conveyor.jobs")
    assert rows[0]["n"] == 1


async def test_enqueue_many_across_chunks_rolls_back_when_a_late_chunk_fails(
    app: App, count_jobs: CountJobs, query_db: QueryDb
) -> None:
    echo = register_echo(app)
    # A failure only PostgreSQL can see, in the last chunk, after two chunks were written.
    await query_db(
        """
        CREATE FUNCTION conveyor.refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.args->>'text' = 'poison' THEN RAISE EXCEPTION 'poisoned job'; END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_poison BEFORE INSERT ON conveyor.jobs
            FOR EACH ROW EXECUTE FUNCTION conveyor.refuse_poison();
        """
    )
    total = 2 * INSERT_CHUNK + 2_000
    specs = [echo.job(i=i, text="poison" if i == total - 1 else "") for i in range(total)]
    with pytest.raises(DatabaseError, match="poisoned job"):
        await app.enqueue_many(specs)
    assert await count_jobs() == 0


async def test_enqueue_sync_and_enqueue_many_sync(app: App, count_jobs: CountJobs) -> None:
    echo = register_echo(app)
    one = echo.enqueue_sync(i=1)
    two = app.enqueue_sync("echo", {"i": 2}, priority=3)
    many = app.enqueue_many_sync([echo.job(i=i) for i in range(3, 6)])

    assert one.args == {"i": 1}
    assert (two.args, two.priority) == ({"i": 2}, 3)
    assert [j.args["i"] for j in many] == [3, 4, 5]
    assert app.get_job_sync(two.id) == two
    assert await count_jobs() == 5


async def test_enqueue_many_sync_across_insert_chunks_is_one_transaction(
    app: App, query_db: QueryDb
) -> None:
    echo = register_echo(app)
    jobs = app.enqueue_many_sync(echo.job(i=i) for i in range(INSERT_CHUNK + 1))
    assert [j.args["i"] for j in jobs] == list(range(INSERT_CHUNK + 1))
    rows = await query_db(
        "SELECT count(*) AS n, count(DISTINCT xmin::text) AS tx FROM conveyor.jobs"
    )
    assert (rows[0]["n"], rows[0]["tx"]) == (INSERT_CHUNK + 1, 1)


async def test_enqueue_of_an_unknown_task_raises_task_not_found(
    app: App, count_jobs: CountJobs
) -> None:
    register_echo(app)
    with pytest.raises(TaskNotFound, match="'nope'"):
        await app.enqueue("nope", {})
    with pytest.raises(TaskNotFound):
        app.enqueue_sync("nope")
    assert await count_jobs() == 0


@pytest.mark.parametrize(
    ("args", "options", "error"),
    [
        ({"i": object()}, {}, InvalidArguments),
        ({"i": float("nan")}, {}, InvalidArguments),
        ({"missing": 1}, {}, InvalidArguments),
        ({"i": 1}, {"delay": timedelta(seconds=-1)}, InvalidJobOptions),
        ({"i": 1}, {"priority": 101}, InvalidJobOptions),
        ({"i": 1}, {"priority": -101}, InvalidJobOptions),
        ({"i": 1}, {"max_attempts": 0}, InvalidJobOptions),
        ({"i": 1}, {"meta": {"x": object()}}, InvalidArguments),
        ({"i": 1}, {"run_at": datetime(2026, 1, 1)}, InvalidJobOptions),
        (
            {"i": 1},
            {"delay": timedelta(seconds=1), "run_at": datetime(2026, 1, 1, tzinfo=UTC)},
            InvalidJobOptions,
        ),
        ({"i": 1}, {"no_such_option": 1}, InvalidJobOptions),
    ],
)
async def test_bad_input_raises_a_typed_error_and_writes_nothing(
    app: App,
    count_jobs: CountJobs,
    args: dict[str, object],
    options: dict[str, Any],
    error: type[Exception],
) -> None:
    register_echo(app)
    before = await count_jobs()
    with pytest.raises(error):
        await app.enqueue("echo", args, **options)
    with pytest.raises(error):
        app.enqueue_sync("echo", args, **options)
    assert await count_jobs() == before == 0


async def test_oversize_payload_raises_payload_too_large_and_writes_nothing(
    database_url: str, count_jobs: CountJobs
) -> None:
    async with App(database_url, config=Config(max_payload_bytes=100)) as small:
        register_echo(small)
        await small.enqueue("echo", {"text": "x" * 50})
        with pytest.raises(PayloadTooLarge) as caught:
            await small.enqueue("echo", {"text": "x" * 200})
        assert caught.value.limit == 100
        with pytest.raises(PayloadTooLarge):
            await small.enqueue_many([JobSpec(task="echo", args={"text": "y" * 101})])
    assert await count_jobs() == 1


async def test_text_postgresql_cannot_store_is_rejected_as_invalid_arguments(
    app: App, count_jobs: CountJobs
) -> None:
    # JSON allows "\u0000" but PostgreSQL's jsonb does not: it must fail as bad input,
    # before the database, like any other argument that cannot be stored.
    register_echo(app)
    with pytest.raises(InvalidArguments):
        await app.enqueue("echo", {"text": "nul\x00byte"})
    assert await count_jobs() == 0


@pytest.mark.parametrize(
    "options",
    [
        {"max_attempts": 2**31},
        {"timeout": timedelta(days=30)},
        {"timeout": timedelta(microseconds=500)},
    ],
    ids=["max_attempts-over-int4", "timeout-over-int4-ms", "timeout-under-1ms"],
)
async def test_options_beyond_the_column_range_are_invalid_job_options(
    app: App, count_jobs: CountJobs, options: dict[str, Any]
) -> None:
    register_echo(app)
    with pytest.raises(InvalidJobOptions):
        await app.enqueue("echo", {"i": 1}, **options)
    assert await count_jobs() == 0


async def test_enqueued_snapshots_equal_the_stored_rows_for_every_kind_of_option(
    app: App,
) -> None:
    # enqueue_many builds a new job's snapshot from what it sent plus what the
    # insert returned (id, state, times); it must be exactly the row a read
    # returns, whatever the options.
    echo = register_echo(app)
    await freeze_time(app, FROZEN)
    specs = [
        echo.job(i=1),
        echo.configure(priority=-7, max_attempts=9, timeout=timedelta(seconds=3)).job(i=2),
        echo.configure(delay=timedelta(minutes=5), meta={"trace": "t-1"}).job(i=3),
        echo.configure(run_at=FROZEN - timedelta(hours=1)).job(i=4),
        echo.configure(concurrency_key="k", concurrency_limit=2).job(i=5),
        echo.configure(window="09:00-17:00 Europe/Paris").job(i=6),
        echo.configure(dedup_key="d").job(i=7),
        echo.configure(dedup_key="d").job(i=8),  # the same job as i=7
        echo.job(text="unicode \u00e9\u4e2d", i=9),
        echo.configure(
            queue="elsewhere",
            concurrency_key="r",
            concurrency_limit=3,
            rate_limit=RateLimit(5, timedelta(seconds=1)),
        ).job(i=10),
    ]
    jobs = await app.enqueue_many(specs)
    stored = [await app.get_job(job.id) for job in jobs]
    assert jobs == stored
    assert jobs[6] == jobs[7]
    superseding = echo.configure(dedup_key="d", on_conflict="supersede", priority=3)
    (superseded,) = await app.enqueue_many([superseding.job(i=11)])
    assert superseded == await app.get_job(jobs[6].id)
    assert (superseded.id, superseded.args, superseded.priority) == (jobs[6].id, {"i": 11}, 3)
    synced = app.enqueue_many_sync([echo.job(i=12), echo.configure(dedup_key="e").job(i=13)])
    assert synced == [await app.get_job(job.id) for job in synced]


async def test_enqueued_args_and_meta_have_the_types_a_worker_reads(app: App) -> None:
    # A bulk enqueue decodes args and meta from the JSON it sent; jsonb re-prints
    # numbers (1e+16 as an integer, no -0.0), and the snapshot must follow it.
    @app.task(name="anything")
    async def anything(ctx: object, **kwargs: object) -> None:
        return None

    numbers = [1e16, -1.5e16, 1.2345678901234567e20, 1e300, -0.0, 1e-05, 5e-324, 0.1, 2**70, 7]
    tricky = {"n": numbers, "nested": {"x": [1e17, {"y": -0.0}]}, "s": "1e+16 -0.0", "b": True}
    specs = [anything.configure(meta={"m": 1e16, "z": -0.0}).job(**tricky), anything.job(i=1)]
    for jobs in (await app.enqueue_many(specs), app.enqueue_many_sync(specs)):
        for job in jobs:
            stored = await app.get_job(job.id)
            assert _typed(job.args) == _typed(stored.args)
            assert _typed(job.meta) == _typed(stored.meta)


def _typed(value: object) -> object:
    """`value` with every leaf paired with its type, and -0.0 told apart from 0.0."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    return (type(value).__name__, repr(value))
