"""Per-task partitions: routing, and moves of a task's jobs that change nothing else."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from conveyor import App, JobContext, Worker, WorkerConfig
from conveyor.errors import ConfigError, InvalidArguments
from conveyor.migrations.migrator import available_migrations, migrate
from conveyor.testing import advance_time, drain, freeze_time
from tests.integration.conftest import QueryDb

JOBS_CHANNEL = "conveyor.jobs"
ALL_VERSIONS = [m.version for m in available_migrations()]


def _register(app: App, *, partition: bool) -> None:
    @app.task(name="hot", partition=partition)
    async def hot(ctx: JobContext, n: int) -> int:
        return n

    @app.task(name="hot.keyed", partition=partition, concurrency_limit=2, concurrency_key="{g}")
    async def hot_keyed(ctx: JobContext, n: int, g: str) -> int:
        return n

    @app.task(name="cold")
    async def cold(ctx: JobContext, n: int) -> int:
        return n


async def _homes(query_db: QueryDb) -> dict[str, set[str]]:
    """`{task: {tables its rows are stored in}}`."""
    rows = await query_db(
        "SELECT task, tableoid::regclass::text AS home FROM conveyor.jobs GROUP BY 1, 2"
    )
    homes: dict[str, set[str]] = {}
    for row in rows:
        homes.setdefault(row["task"], set()).add(row["home"])
    return homes


async def _everything(app: App, ids: list[int]) -> tuple[Any, ...]:
    """What a partition move must leave alone: every job, the queue and key counts."""
    return (
        await app.get_jobs(ids),
        await app.queue_stats(),
        [(k.queue, k.key, k.waiting, k.running, k.total_enqueued) for k in await app.keys()],
    )


async def _enqueue_mix(app: App) -> list[int]:
    jobs = await app.enqueue_many(
        [app.tasks["hot"].job(n=i) for i in range(5)]
        + [app.tasks["hot.keyed"].job(n=i, g="a" if i < 3 else "b") for i in range(4)]
        + [app.tasks["cold"].job(n=i) for i in range(3)]
    )
    delayed = await app.tasks["hot"].configure(delay=timedelta(hours=1)).enqueue(n=99)
    return [j.id for j in jobs] + [delayed.id]


async def _claim_as_ghost(app: App, limit: int) -> list[dict[str, Any]]:
    return await app.db.fetch(
        "claim",
        "job_claim_many",
        {"queues": ["default"], "limit": limit, "worker_id": "ghost", "lease_s": 300.0},
    )


async def _finish(app: App, job_id: int, token: int) -> list[dict[str, Any]]:
    return await app.db.fetch(
        "finish",
        "job_finish_many",
        {
            "id": [job_id],
            "token": [token],
            "state": ["succeeded"],
            "result": ["7"],
            "error": [None],
            "retry_in_s": [0.0],
            "refund": [False],
            "channel": JOBS_CHANNEL,
        },
    )


async def test_a_starting_worker_creates_the_partitions_its_tasks_ask_for_and_rows_follow_the_task(
    app: App, query_db: QueryDb
) -> None:
    _register(app, partition=True)
    worker = Worker(app, WorkerConfig(poll_interval=timedelta(milliseconds=50)))
    await worker.start()
    await worker.stop()

    partitions = {p.task: p.table_name for p in await app.partitions.all()}
    assert sorted(partitions) == ["hot", "hot.keyed"]
    assert partitions["hot.keyed"].startswith("jobs_task_hot_keyed_")
    ids = await _enqueue_mix(app)
    assert await _homes(query_db) == {
        "hot": {f"conveyor.{partitions['hot']}"},
        "hot.keyed": {f"conveyor.{partitions['hot.keyed']}"},
        "cold": {"conveyor.jobs_default"},
    }
    # Claims walk every partition, in claim order.
    done = await drain(app, WorkerConfig(poll_interval=timedelta(milliseconds=50)))
    assert {j.id: j.state for j in done} == {i: "succeeded" for i in ids[:-1]} | {
        ids[-1]: "scheduled"
    }
    # A second start finds them and creates nothing.
    assert await app.partitions.sync() == []


async def test_creating_partitions_moves_every_job_of_the_task_and_changes_nothing_else(
    app: App, query_db: QueryDb
) -> None:
    _register(app, partition=True)
    ids = await _enqueue_mix(app)
    running, finished = await _claim_as_ghost(app, 2)
    assert await _finish(app, finished["id"], finished["lease_token"])
    before = await _everything(app, ids)
    assert {j.state for j in before[0]} == {"available", "scheduled", "running", "succeeded"}

    assert sorted(await app.partitions.sync()) == ["hot", "hot.keyed"]

    assert await _everything(app, ids) == before
    homes = await _homes(query_db)
    assert all(len(tables) == 1 for tables in homes.values()), homes
    assert homes["cold"] == {"conveyor.jobs_default"}
    # The running job kept its lease: only its fencing token finishes it.
    assert not await _finish(app, running["id"], running["lease_token"] + 1)
    assert await _finish(app, running["id"], running["lease_token"])
    assert (await app.get_job(running["id"])).result == 7
    # Keys still hold across the move: "a" runs at most 2 at once.
    claimed = await _claim_as_ghost(app, 20)
    keyed = [r for r in claimed if r["task"] == "hot.keyed"]
    assert sorted(r["concurrency_key"] for r in keyed) == ["a", "a", "b"]


async def test_removing_a_partition_folds_its_jobs_back_into_the_default(
    app: App, query_db: QueryDb
) -> None:
    _register(app, partition=True)
    await app.partitions.sync()
    ids = await _enqueue_mix(app)
    (running,) = await _claim_as_ghost(app, 1)
    before = await _everything(app, ids)
    table = {p.task: p.table_name for p in await app.partitions.all()}["hot"]

    assert await app.partitions.remove("hot") is True

    assert await _everything(app, ids) == before
    assert (await _homes(query_db))["hot"] == {"conveyor.jobs_default"}
    assert await query_db("SELECT to_regclass(%s) AS t", f"conveyor.{table}") == [{"t": None}]
    assert [p.task for p in await app.partitions.all()] == ["hot.keyed"]
    assert await app.partitions.remove("hot") is False
    assert await _finish(app, running["id"], running["lease_token"])
    # New jobs of the task land in the default partition again.
    await app.tasks["hot"].enqueue(n=1)
    assert (await _homes(query_db))["hot"] == {"conveyor.jobs_default"}


async def test_creating_a_partition_again_returns_it_and_changes_nothing(app: App) -> None:
    first = await app.partitions.create("reports.render")
    assert await app.partitions.create("reports.render") == first
    (info,) = await app.partitions.all()
    assert (info.task, info.table_name, info.estimated_rows) == ("reports.render", first, 0)
    assert info.size_bytes > 0
    # Names that differ only in punctuation get different tables.
    assert await app.partitions.create("reports:render") != first


@pytest.mark.parametrize("bad", ["", "a\x00b", "x" * 1_001, None, 42])
async def test_a_bad_task_name_is_refused_and_creates_nothing(app: App, bad: Any) -> None:
    with pytest.raises(InvalidArguments):
        await app.partitions.create(bad)
    with pytest.raises(InvalidArguments):
        await app.partitions.remove(bad)
    assert await app.partitions.all() == []


def test_partition_is_a_task_option_not_a_job_option(app: App) -> None:
    with pytest.raises(ConfigError):
        app.task(name="t", partition="yes")  # type: ignore[arg-type]


async def test_dedup_and_superseding_hold_in_a_partitioned_task(app: App) -> None:
    @app.task(name="hot", partition=True)
    async def hot(ctx: JobContext, n: int) -> int:
        return n

    await app.partitions.sync()
    first = await hot.configure(dedup_key="d").enqueue(n=1)
    again = await hot.configure(dedup_key="d").enqueue(n=2)
    assert again.id == first.id
    newer = await hot.configure(dedup_key="d", on_conflict="supersede").enqueue(n=3)
    assert (await app.get_job(newer.id)).args == {"n": 3}
    assert (await app.counts())["default"]["available"] == 1


@pytest.mark.parametrize("move", ["create", "remove"])
async def test_statements_that_waited_for_a_move_see_the_moved_jobs(
    app: App, database_url: str, query_db: QueryDb, move: str
) -> None:
    # A statement that had locked `jobs` before a move could plan with the old
    # list of partitions and, run after the move, miss the moved rows: a
    # worker's outcome write updated nothing and the job ran a second time.
    _register(app, partition=True)
    if move == "remove":
        await app.partitions.sync()
    ids = await _enqueue_mix(app)
    first, second = await _claim_as_ghost(app, 2)
    async with await psycopg.AsyncConnection.connect(database_url) as mover:
        function = f"task_partition_{move}"
        await mover.execute(f"SELECT conveyor.{function}('hot')".encode())  # left uncommitted
        finish = asyncio.create_task(_finish(app, first["id"], first["lease_token"]))
        read = asyncio.create_task(app.get_job(second["id"]))
        await _until_waiting_on_a_lock(query_db, 2)
        await mover.commit()
    assert await finish
    assert (await read).state == "running"
    assert len(await app.get_jobs(ids)) == len(ids)


async def _until_waiting_on_a_lock(query_db: QueryDb, backends: int) -> None:
    """Wait until `backends` other sessions of this database wait for a lock."""
    async with asyncio.timeout(10):
        while True:
            rows = await query_db(
                "SELECT count(*) AS n FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if rows[0]["n"] >= backends:
                return
            await asyncio.sleep(0.01)


async def test_upgrading_keeps_every_job_and_its_id_sequence(
    database_url: str, query_db: QueryDb
) -> None:
    # Migration 0013 turns the existing table into the default partition; in a
    # schema of another name, so the functions' own table names are checked too.
    migrate(database_url, "other", target=12)
    await query_db(
        "INSERT INTO other.jobs (queue, task, args, state, max_attempts, run_at, created_at)"
        " SELECT 'default', 'hot', jsonb_build_object('n', i), 'available', 3, now(), now()"
        " FROM generate_series(1, 5) AS i"
    )
    before = await query_db("SELECT * FROM other.jobs ORDER BY id")
    stats_before = await query_db("SELECT * FROM other.queue_stats ORDER BY queue")

    assert migrate(database_url, "other") == ALL_VERSIONS[12:]
    assert await query_db("SELECT * FROM other.jobs ORDER BY id") == before
    assert await query_db("SELECT * FROM other.queue_stats ORDER BY queue") == stats_before

    app = App(database_url, schema="other")
    try:
        _register(app, partition=True)
        assert sorted(await app.partitions.sync()) == ["hot", "hot.keyed"]
        new = await app.tasks["hot"].enqueue(n=1)
        assert new.id == before[-1]["id"] + 1
        homes = await query_db("SELECT DISTINCT tableoid::regclass::text AS t FROM other.jobs")
        assert homes == [{"t": f"other.{(await app.partitions.all())[0].table_name}"}]
        done = await drain(app, WorkerConfig(poll_interval=timedelta(milliseconds=50)))
        assert [j.state for j in done] == ["succeeded"] * 6
    finally:
        await app.close()


async def test_retention_prunes_a_partitioned_tasks_history_like_any_other(
    app: App, query_db: QueryDb
) -> None:
    _register(app, partition=True)
    await app.partitions.sync()
    await freeze_time(app, datetime(2031, 1, 1, tzinfo=UTC))
    await _enqueue_mix(app)
    await drain(app, WorkerConfig(poll_interval=timedelta(milliseconds=50)))
    stats_before = await app.queue_stats()

    await advance_time(app, timedelta(hours=2))
    report = await app.prune(older_than=timedelta(hours=1))

    assert report.jobs == 12
    # Only the delayed job is left, in its task's partition; the totals stay.
    assert [(h, n) for h, n in (await _homes(query_db)).items()] == [
        ("hot", {f"conveyor.{(await _tables(app))['hot']}"})
    ]
    after = (await app.queue_stats())[0]
    assert after.total_succeeded == stats_before[0].total_succeeded == 12


@pytest.mark.parametrize("name", ['it\'s "quoted"', "ünïcode.任务", "UPPER.Case", "a" * 1_000])
async def test_any_task_name_gets_a_partition_its_jobs_are_routed_to(
    app: App, query_db: QueryDb, name: str
) -> None:
    @app.task(name=name)
    async def odd(ctx: JobContext) -> None:
        return None

    table = await app.partitions.create(name)
    assert len(table.encode()) <= 63
    await odd.enqueue()
    assert await _homes(query_db) == {name: {f"conveyor.{table}"}}
    assert await app.partitions.remove(name)
    assert await _homes(query_db) == {name: {"conveyor.jobs_default"}}


async def _tables(app: App) -> dict[str, str]:
    return {p.task: p.table_name for p in await app.partitions.all()}
