"""Schema migrations against a real PostgreSQL: fresh installs, re-runs, races, tampering."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator

import psycopg
import pytest

from conveyor import App, ConveyorError, SchemaVersionError, Worker
from conveyor.migrations.migrator import available_migrations, latest_version, migrate
from conveyor.testing import drain
from tests.integration.conftest import QueryDb

ALL_VERSIONS = [m.version for m in available_migrations()]


@pytest.fixture
async def other_app(database_url: str) -> AsyncIterator[App]:
    """An App on this test's database in the schema `other`, not yet migrated."""
    instance = App(database_url, schema="other")
    yield instance
    await instance.close()


async def test_fresh_schema_migrates_to_the_latest_version(
    other_app: App, query_db: QueryDb
) -> None:
    assert await other_app.migrate() == ALL_VERSIONS
    assert other_app.check_schema() == latest_version()
    rows = await query_db("SELECT version, name, checksum FROM other.schema_migrations")
    assert [(r["version"], r["name"], r["checksum"]) for r in rows] == [
        (m.version, m.name, m.checksum) for m in available_migrations()
    ]


async def test_fresh_schema_runs_jobs_independently_of_the_default_schema(
    app: App, other_app: App
) -> None:
    await other_app.migrate()

    @other_app.task(name="hello")
    async def hello(ctx: object, name: str) -> str:
        return f"hello {name}"

    job = await hello.enqueue(name="other")
    (done,) = await drain(other_app)
    assert done.id == job.id
    assert done.result == "hello other"
    assert await app.counts() == {}


async def test_second_migrate_applies_nothing(other_app: App, query_db: QueryDb) -> None:
    await other_app.migrate()
    assert await other_app.migrate() == []
    assert other_app.migrate_sync() == []
    rows = await query_db("SELECT count(*) AS n FROM other.schema_migrations")
    assert rows[0]["n"] == len(ALL_VERSIONS)


async def test_concurrent_migrations_apply_each_version_exactly_once(
    other_app: App, query_db: QueryDb
) -> None:
    conninfo = other_app.db.conninfo
    start = threading.Barrier(5)
    applied: list[list[int]] = []
    failures: list[BaseException] = []

    def migrator() -> None:
        start.wait(timeout=10)
        try:
            applied.append(migrate(conninfo, "other"))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=migrator) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert failures == []
    assert len(applied) == 5
    assert sorted(v for versions in applied for v in versions) == ALL_VERSIONS
    rows = await query_db(
        "SELECT version, count(*) AS n FROM other.schema_migrations GROUP BY version"
    )
    assert {r["version"]: r["n"] for r in rows} == dict.fromkeys(ALL_VERSIONS, 1)
    assert other_app.check_schema() == latest_version()


async def test_tampered_checksum_is_refused(app: App, query_db: QueryDb) -> None:
    await query_db("UPDATE conveyor.schema_migrations SET checksum = 'edited' WHERE version = 1")
    with pytest.raises(SchemaVersionError, match="checksum mismatch"):
        app.check_schema()
    with pytest.raises(SchemaVersionError, match="checksum mismatch"):
        await app.migrate()


async def test_schema_newer_than_this_code_is_refused(app: App, query_db: QueryDb) -> None:
    future = latest_version() + 1
    await query_db(
        "INSERT INTO conveyor.schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
        future,
        "from_the_future",
        "0" * 64,
    )
    with pytest.raises(SchemaVersionError, match="newer than this conveyor"):
        app.check_schema()
    with pytest.raises(SchemaVersionError, match="upgrade conveyor"):
        await app.migrate()


async def test_worker_refuses_to_start_on_a_newer_schema(app: App, query_db: QueryDb) -> None:
    await query_db(
        "INSERT INTO conveyor.schema_migrations (version, name, checksum) VALUES (%s, 'x', 'x')",
        latest_version() + 1,
    )
    worker = Worker(app)
    try:
        with pytest.raises(SchemaVersionError):
            await worker.start()
    finally:
        await worker.stop()


async def test_check_schema_on_an_unmigrated_schema_asks_for_conveyor_migrate(
    other_app: App, query_db: QueryDb
) -> None:
    with pytest.raises(SchemaVersionError, match="`conveyor migrate`"):
        other_app.check_schema()
    # Checking is read-only: it created nothing.
    rows = await query_db("SELECT count(*) AS n FROM pg_namespace WHERE nspname = 'other'")
    assert rows[0]["n"] == 0


async def test_worker_refuses_to_start_on_an_unmigrated_schema(other_app: App) -> None:
    worker = Worker(other_app)
    try:
        with pytest.raises(SchemaVersionError, match="`conveyor migrate`"):
            await worker.start()
    finally:
        await worker.stop()


async def test_failed_migration_leaves_no_partial_schema(other_app: App, query_db: QueryDb) -> None:
    # Occupy a name the first migration creates: it must fail and roll back entirely.
    await query_db("CREATE SCHEMA other")
    await query_db("CREATE TABLE other.jobs (id int)")
    with pytest.raises((ConveyorError, psycopg.Error), match="jobs"):
        await other_app.migrate()
    # Nothing of the failed migration survives: not its first table, not its record.
    rows = await query_db("SELECT to_regclass('other.clock') IS NULL AS gone")
    assert rows[0]["gone"]
    recorded = await query_db(
        "SELECT count(*) AS n FROM pg_tables"
        " WHERE schemaname = 'other' AND tablename = 'schema_migrations'"
    )
    if recorded[0]["n"]:
        assert await query_db("SELECT version FROM other.schema_migrations") == []
    with pytest.raises(SchemaVersionError, match="`conveyor migrate`"):
        other_app.check_schema()
